"""What a job image starts at boot, and what it leaves out (issue 9: a boot path with no waiting).

A job VM boots once, runs one job and powers off, under TCG on many sites, so every unit a
stock Debian starts costs the job's start time: logins, periodic maintenance, mounts for
debugging, module loads a job never needs. This table is the one place that says what is
left out and why; the app stage writes it into the guest for the seal to apply (`systemctl
mask`, after provisioning, so nothing the application's own steps start is in the way), and
the manifest lists it. Masked units are not removed from the disk; the network units stay
when the recipe asks for a network (`job.network`) or for sshd (`guest.ssh`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmbuild.recipe import Recipe

# Where the seal finds the list in the guest (one unit a line; vmbuild's names only).
LEFT_OUT_FILE = "/etc/vmbuild/boot-left-out"


# How the seal leaves a unit out: masked (never starts); on demand (not started at boot, still
# started by its socket when something uses it); masked unless a modules-load.d file lists a
# module (the seal looks after provisioning; only systemd-modules-load.service is left out so).
MASKED = "masked"
ON_DEMAND = "on-demand"
UNLESS_MODULES_LISTED = "masked-unless-modules-listed"
# What the seal deletes with a unit left out: the data only that unit would use.
REMOVED = "removed"


@dataclass(frozen=True)
class LeftOut:
    unit: str
    why: str
    how: str = MASKED
    removes: tuple[str, ...] = ()  # absolute paths


ALWAYS = (
    LeftOut("getty.target", "no logins: the console is the runner's serial port "
            "(`vmbuild run --shell` opens one itself)"),
    LeftOut("timers.target", "no periodic maintenance (apt, fstrim, e2scrub, dpkg backups) in "
            "a VM that lives for one job"),
    LeftOut("systemd-random-seed.service", "the seed file of a throwaway layer is never reused; "
            "the kernel seeds itself"),
    LeftOut("systemd-journal-flush.service", "the journal is volatile (nothing to flush)"),
    LeftOut("systemd-update-utmp.service", "no logins to record"),
    LeftOut("systemd-update-utmp-runlevel.service", "no logins to record"),
    LeftOut("systemd-pstore.service", "no firmware crash store in a VM"),
    LeftOut("e2scrub_reap.service", "no LVM snapshots to reap"),
    LeftOut("proc-sys-fs-binfmt_misc.automount", "no foreign binary formats"),
    LeftOut("sys-kernel-debug.mount", "debugging filesystem, mountable by hand"),
    LeftOut("sys-kernel-tracing.mount", "tracing filesystem, mountable by hand"),
    LeftOut("sys-fs-fuse-connections.mount", "FUSE control filesystem (FUSE itself loads on "
            "first use)"),
    LeftOut("dev-hugepages.mount", "huge pages filesystem, mountable by hand"),
    LeftOut("modprobe@drm.service", "no display"),
    LeftOut("modprobe@efi_pstore.service", "no firmware crash store in a VM"),
    LeftOut("modprobe@fuse.service", "the kernel loads it when /dev/fuse is first opened"),
    LeftOut("modprobe@loop.service", "the kernel loads it when a loop device is first used"),
    LeftOut("modprobe@dm_mod.service", "the kernel loads it when device-mapper is first used"),
    LeftOut("modprobe@configfs.service", "nothing in a job VM configures the kernel through it"),
    LeftOut("sys-kernel-config.mount", "nothing in a job VM configures the kernel through it"),
    LeftOut("systemd-fsck-root.service", "a sealed disk booted from a throwaway layer "
            "(fsck.mode=skip on the kernel command line, too)"),
    LeftOut("systemd-fsckd.socket", "no file system checks (see above)"),
    LeftOut("systemd-journald-audit.socket", "no audit log in a job VM"),
    LeftOut("systemd-initctl.socket", "no SysV init clients"),
    LeftOut("systemd-sysusers.service", "the build created every system user already"),
    LeftOut("systemd-user-sessions.service", "no logins"),
    LeftOut("systemd-hwdb-update.service", "udev's hardware database (22 MiB of names for real "
            "USB and PCI devices, keyboard maps) is deleted at seal: a job VM's virtual devices "
            "need none of it, and every job start would ship it",
            removes=("/usr/lib/udev/hwdb.bin", "/etc/udev/hwdb.bin", "/usr/lib/udev/hwdb.d")),
    LeftOut("systemd-logind.service", "no logins; the job's wrapper itself turns the ACPI "
            "power button (a validation boot's `until: started`, a soft power-off from outside) "
            "into a clean power-off. Under TCG logind and the D-Bus it starts were seconds of "
            "every start, beside the job's own"),
    LeftOut("dbus.service", "not started at boot (it was 2 s of a TCG start, beside the job); "
            "its socket starts it for the first program that uses D-Bus", ON_DEMAND),
    LeftOut("systemd-modules-load.service", "no module is listed in modules-load.d (the seal "
            "keeps it when the image lists some)", UNLESS_MODULES_LISTED),
    # Generators run before systemd loads a single unit, each one an executable to start
    # under TCG; systemd skips those masked in /etc/systemd/system-generators. The fstab
    # generator stays (the root's mount unit and any mount the image adds to /etc/fstab; the
    # kernel command line already mounts the root read-write).
    LeftOut("systemd-getty-generator", "no logins (getty.target is left out too)"),
    LeftOut("systemd-gpt-auto-generator", "the disk is MBR/ESP laid out by vmbuild, "
            "listed in /etc/fstab"),
    LeftOut("systemd-cryptsetup-generator", "no encrypted volumes"),
    LeftOut("systemd-integritysetup-generator", "no integrity volumes"),
    LeftOut("systemd-veritysetup-generator", "no verity volumes"),
    LeftOut("systemd-hibernate-resume-generator", "a job VM never hibernates"),
    LeftOut("systemd-system-update-generator", "no offline updates"),
    LeftOut("systemd-sysv-generator", "no SysV init scripts are started"),
    LeftOut("systemd-rc-local-generator", "no /etc/rc.local"),
    LeftOut("systemd-debug-generator", "no debug shell"),
    LeftOut("systemd-run-generator", "no `systemd.run=` on a job VM's kernel command line: "
            "the job is the job unit's"),
)

NETWORK = (
    LeftOut("systemd-networkd.service", "no network: job.network is false"),
    LeftOut("systemd-networkd.socket", "no network: job.network is false"),
    LeftOut("systemd-networkd-wait-online.service", "no network: job.network is false"),
    LeftOut("systemd-network-generator.service", "no network: job.network is false"),
    LeftOut("systemd-resolved.service", "no network: job.network is false"),
)


# udev names devices, loads drivers for what the kernel finds and runs rules. A job VM without
# a network needs none of it: its disks are found by the wrapper in the kernel's own list, the
# initramfs has loaded the disk's driver, devtmpfs makes every device node, and the wrapper
# loads the power button's driver itself. Its coldplug of every device was the largest work
# beside the job's start under TCG.
UDEV = (
    LeftOut("systemd-udevd.service", "no device management needed: no network, no VMware "
            "Tools (devtmpfs makes the device nodes; the wrapper finds the job's disks)"),
    LeftOut("systemd-udevd-control.socket", "udev is left out (see systemd-udevd.service)"),
    LeftOut("systemd-udevd-kernel.socket", "udev is left out (see systemd-udevd.service)"),
    LeftOut("systemd-udev-trigger.service", "udev is left out (see systemd-udevd.service)"),
    LeftOut("systemd-udev-settle.service", "udev is left out (see systemd-udevd.service)"),
)


# The services the job unit is ordered after (vmbuild/guest/vmbuild-job.service): the modules
# and kernel settings the image lists. On one vCPU they start beside journald, the remount
# and tmpfiles; at the default weight they took 0.7-1.3 s of a TCG start while the job waited
# for them. The job's own weight (its CPUWeight) makes them what the job is: first.
JOB_WAITS_FOR = ("systemd-modules-load.service", "systemd-sysctl.service")
JOB_CPU_WEIGHT = 10000


def job_first_dropin() -> bytes:
    """The drop-in giving each service in JOB_WAITS_FOR the job's CPU weight."""
    return (b"# vmbuild: the job waits for this service, so it runs with the job's weight\n"
            b"[Service]\nCPUWeight=%d\n" % JOB_CPU_WEIGHT)


def left_out(recipe: Recipe) -> tuple[LeftOut, ...]:
    """The units this recipe's image does not start. The network stays for `job.network`
    and for `guest.ssh` (an sshd without a network would be useless); udev stays with a
    network (systemd-networkd manages links through it) and with VMware Tools."""
    keep_network = recipe.job.network or recipe.guest.ssh
    keep_udev = keep_network or recipe.guest.vmware_tools
    return (ALWAYS + (() if keep_network else NETWORK)
            + (() if keep_udev else UDEV))


def left_out_file(recipe: Recipe) -> bytes:
    """One `HOW UNIT` line each, then a `removed PATH` line for each path it takes along,
    for the seal (vmbuild/guest/vmbuild-seal)."""
    return "".join(f"{item.how} {item.unit}\n" + "".join(f"{REMOVED} {path}\n"
                                                           for path in item.removes)
                   for item in left_out(recipe)).encode()


def manifest_entry(recipe: Recipe) -> list[dict[str, object]]:
    return [{"unit": item.unit, "how": item.how, "why": item.why,
             **({"removes": list(item.removes)} if item.removes else {})}
            for item in left_out(recipe)]
