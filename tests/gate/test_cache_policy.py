"""Crash-consistency gate for a QEMU disk cache policy. Copy this file into your CI.

Before changing a default cache policy, prove that a host power loss at random instants never
leaves the guest's filesystem corrupt or its fsynced data lost::

    pip install crashlab        # or ./bootstrap setup in a crashlab checkout (Debian 12, root)
    pytest test_cache_policy.py --crashlab-fs ext4,xfs --crashlab-cache none \\
        --crashlab-barrier on --crashlab-scale 8 --junitxml results/gate.xml

- one test per filesystem: it fails if any checked crash state of the policy was corrupt or lost
  fsynced data, and its failure message (also in the JUnit XML) names every such state with its
  outcome, fsck output and the `crashlab reproduce ID --store ...` command that rebuilds it;
- one sensitivity test: ext4 with `cache=unsafe` and `barrier=off` under the same workload and
  crash model must fail. If it does not, the gate cannot see failures and a pass means nothing.

Outcomes and recordings are kept in `--crashlab-store` (default `results/crashlab.sqlite`): a rerun
only checks what is new, and `crashlab report --store results/crashlab.sqlite` prints the full
table. Zero failures is not zero risk: a policy test passes only if its cell's exact 95 % upper
bound on the failure rate is below `--crashlab-max-rate` (default 1 %, which 299 states without a
failure reach; 0 of 32 bounds it only below 9 %), and the bound is printed at the end of the run and
stored as a JUnit property. `--crashlab-states` defaults to what the max rate needs (299), and
those must be distinct crash states: with barriers a small workload has few (at scale 1, ext4
124 and XFS 73 under `cache=none`), hence `--crashlab-scale 8`; the gate says when a cell has too
few.
`--crashlab-host-mount` checks on the CI host itself instead of in checker guests: only on
disposable machines (a corrupt image can crash the kernel that mounts it).
"""

from __future__ import annotations

import pytest

from crashlab.pytest_plugin import CellFactory

pytestmark = pytest.mark.crashlab


def test_policy_keeps_filesystem_and_fsynced_data(crashlab_cell: CellFactory, crashlab_fs: str) -> None:
    crashlab_cell(fs=crashlab_fs).assert_safe()


def test_gate_sees_failures_of_a_known_unsafe_configuration(crashlab_cell: CellFactory) -> None:
    crashlab_cell.sensitivity().assert_detects_failures()
