"""The guest layer: everything between a job description and a real QEMU guest that runs it.

    provision   the guest kernel (a Debian cloud kernel, or the user's) and a generated initramfs
    machine     one QEMU VM's life: launch, QMP, console, deadline, shutdown escalation
    shares      what a guest may see of the host: a read-only view, one writable results share
    job         a job description in, a typed GuestRun out: the one path record, dm-flakey and the
                checker guest take
    transport   how the job reaches the guest (virtiofs: the host's Python; shell: busybox)
    shell       the busybox transport's plan for the built-in shell workload
    inguest/    what runs inside the guest (the host imports only inguest.init: /init and paths)

Nothing here knows a recorder's files or a campaign: those are record.py's and campaign.py's.
"""
