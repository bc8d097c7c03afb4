"""vagrant/Vagrantfile: `vagrant validate` where Vagrant is installed, and always the parts that
matter read from the file itself, with its generated suite script run through bash."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).parents[1] / "vagrant"
VAGRANTFILE = VAGRANT_DIR / "Vagrantfile"
TEXT = VAGRANTFILE.read_text()

needs_ruby = pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed")
needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None,
                                   reason="vagrant not installed (Debian 12: apt-get install vagrant)")


def validate(vagrantfile_text: str, tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    # A copy beside a project root of its own: validate leaves .vagrant/ behind where it runs.
    (tmp_path / "vagrant").mkdir(exist_ok=True)
    (tmp_path / "vagrant" / "Vagrantfile").write_text(vagrantfile_text)
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant-home"), "VAGRANT_CHECKPOINT_DISABLE": "1",
           **extra}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["vagrant", "validate", *args], cwd=tmp_path / "vagrant", env=env,
                              capture_output=True, text=True, timeout=120)

    out = run()
    if "No usable default provider" in out.stdout + out.stderr:
        # Vagrant without libvirt or VirtualBox can check only the provider-independent config.
        out = run("--ignore-provider")
    return out


@needs_vagrant
def test_vagrant_validates_it(tmp_path: Path) -> None:
    out = validate(TEXT, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "validated successfully" in out.stdout


@needs_vagrant
def test_vagrant_validates_the_cluster_layout(tmp_path: Path) -> None:
    out = validate(TEXT, tmp_path, CRASHLAB_WORKERS="2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "validated successfully" in out.stdout


@needs_vagrant
def test_vagrant_validate_catches_a_broken_setting(tmp_path: Path) -> None:
    out = validate(TEXT.replace("config.vm.box =", "config.vm.boxx ="), tmp_path)
    assert out.returncode != 0 and "boxx" in out.stdout + out.stderr


@needs_ruby
def test_ruby_syntax() -> None:
    out = subprocess.run(["ruby", "-c", str(VAGRANTFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Syntax OK" in out.stdout, out.stderr


def test_box_providers_and_provisioning() -> None:
    assert re.search(r'^\s*config\.vm\.box = "debian/bookworm64"$', TEXT, re.M)
    providers = set(re.findall(r"config\.vm\.provider :(\w+) do", TEXT))
    assert providers == {"libvirt", "virtualbox"}
    setup = re.search(r'config\.vm\.provision "setup", type: "shell", inline: "(.*)"', TEXT)
    assert setup and setup.group(1).endswith("./bootstrap setup")
    assert re.search(r'config\.vm\.provision "suite", type: "shell", run: "always"', TEXT)
    assert TEXT.index('provision "setup"') < TEXT.index('provision "suite"')  # provisioners run in order
    assert '"./bootstrap test --junitxml=results/junit.xml"' in TEXT
    assert re.search(r"config\.trigger\.after \[:up, :provision\]", TEXT)
    assert re.search(r'system\("rsync", .*\n.*GUEST_ROOT\}/results/", "#\{dest\}/"\)', TEXT)
    # The README's set-up really is `./bootstrap setup`.
    assert "setup)" in (VAGRANT_DIR.parent / "bootstrap").read_text()


def suite_script(tmp_path: Path, **env: str) -> str:
    """The suite provisioner's script as Vagrant would send it (Vagrant.configure stubbed out)."""
    out = subprocess.run(["ruby", "-e", 'module Vagrant; def self.configure(*); end; end; '
                          f'load {str(VAGRANTFILE)!r}; print SUITE_SCRIPT'],
                         capture_output=True, text=True, timeout=60, check=True, env={**os.environ, **env})
    return out.stdout


@needs_ruby
def test_suite_script_runs_every_command_and_keeps_the_worst_status(tmp_path: Path) -> None:
    script = suite_script(tmp_path)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert r"./bootstrap\ test\ --junitxml" in script and r"tests/gate\ -m\ slow" in script
    # Run it for real against a scratch root, with a suite of our own that fails then succeeds.
    root = tmp_path / "root"
    root.mkdir()
    script = suite_script(tmp_path, CRASHLAB_SUITE="echo ran > results/ran; exit 3")
    subprocess.run(["bash", "-c", script.replace("cd /crashlab", f"cd {root}")], check=True, timeout=60,
                   capture_output=True)
    assert (root / "results" / "ran").read_text() == "ran\n"
    assert (root / "results" / "suite-status").read_text() == "3\n"


def ruby_eval(expr: str, **env: str) -> str:
    """`expr` evaluated after loading the Vagrantfile (Vagrant.configure stubbed out)."""
    out = subprocess.run(["ruby", "-e", 'module Vagrant; def self.configure(*); end; end; '
                          f'load {str(VAGRANTFILE)!r}; {expr}'],
                         capture_output=True, text=True, timeout=60, check=True, env={**os.environ, **env})
    return out.stdout


@needs_ruby
def test_the_cluster_layout_is_one_scheduler_and_n_workers_as_services() -> None:
    assert ruby_eval("print MACHINES.to_a.map { |m| m.join('=') }.join(' ')") == "scheduler=192.168.56.10"
    machines = ruby_eval("print MACHINES.to_a.map { |m| m.join('=') }.join(' ')", CRASHLAB_WORKERS="3")
    assert machines == ("scheduler=192.168.56.10 worker1=192.168.56.11 worker2=192.168.56.12 "
                        "worker3=192.168.56.13")
    scheduler = ruby_eval("print SCHEDULER_SCRIPT")
    worker = ruby_eval('print worker_script("192.168.56.12")')
    for script in (scheduler, worker):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
        assert "Restart=always" in script and "systemctl restart crashlab-" in script
    assert "distributed.cli.dask_scheduler --host 192.168.56.10 --port 8786" in scheduler
    assert ("/crashlab/.venv/bin/crashlab worker --scheduler tcp://192.168.56.10:8786 -- --host 192.168.56.12"
            in worker)
    # Each machine gets its own service provisioner; the suite and its trigger are the single VM's.
    assert re.search(r'config\.vm\.define name, primary: name == "scheduler"', TEXT)
    assert re.search(r'node\.vm\.provision "service", type: "shell", run: "always"', TEXT)
    assert TEXT.index("WORKERS.positive?") < TEXT.index('config.vm.provision "suite"')
