"""TCP throughput between two Linux guest interfaces through `vvu serve net --switch`, with
the checksum/TSO offloads negotiated and without (issue 14, part 3).

One TCG guest with two virtio-net devices on two ports of one switch, the second moved into its
own network namespace so that TCP between 10.0.0.2 and 10.0.0.3 crosses the switch. busybox
`httpd` serves a file of `--mib` MiB from tmpfs on each side and `wget` fetches it from the
other; the guest times each transfer with /proc/uptime (10 ms resolution). Cases:

- `on`: both devices negotiate CSUM, GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6: TSO packets pass
  through the switch whole;
- `on, rx without TSO`: as `on`, but the second device is started with QEMU's
  `guest_csum=off,guest_tso4=off,guest_tso6=off`: what goes to it is segmented and checksummed
  in software by the switch;
- `off`: `vvu serve net --no-offloads`: the guests segment and checksum themselves.

    PYTHONPATH=python python benches/net_guest_tcp.py --rounds 2 --mib 32

Caveat: the guest runs under TCG (emulated CPU), so the figures are the guest's CPU cost, not
what the switch can carry; only ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daemons import stop_process, wait_for_socket
from guest import NET_PAIR_SETUP, guest_image, run_guest, vhost_user_net_args

SCRIPT = (
    """
set -e
"""
    + NET_PAIR_SETUP
    + """
dd if=/dev/urandom of=/tmp/www/data bs=1M count={mib} 2>/dev/null
t0=$(cut -d' ' -f1 /proc/uptime)
wget -q -O /dev/null http://10.0.0.3:8080/data
t1=$(cut -d' ' -f1 /proc/uptime)
nsenter -t $NS -n wget -q -O /dev/null http://10.0.0.2:8080/data
t2=$(cut -d' ' -f1 /proc/uptime)
echo $t0 $t1 $t2
kill $NS
"""
)

CASES = {
    "on": ([], ""),
    "on, rx without TSO": ([], "guest_csum=off,guest_tso4=off,guest_tso6=off"),
    "off": (["--no-offloads"], ""),
}


def run_case(flags: list[str], second: str, mib: int) -> tuple[float, float]:
    """Seconds for the transfer eth1 → eth0 and eth0 → eth1."""
    with tempfile.TemporaryDirectory() as tmp:
        socks = [Path(tmp) / "p0.sock", Path(tmp) / "p1.sock"]
        cmd = [sys.executable, "-m", "vvu", "-q", "serve", "net", "--socket-path", str(socks[0])]
        cmd += ["--switch", "sw", "--switch-port", str(socks[1]), *flags]
        proc = subprocess.Popen(cmd)
        try:
            wait_for_socket(socks[0], proc)
            wait_for_socket(socks[1], proc)
            args = vhost_user_net_args(0, str(socks[0]), "52:54:00:12:34:50")
            args += vhost_user_net_args(1, str(socks[1]), "52:54:00:12:34:51", second)
            result = run_guest(SCRIPT.format(mib=mib), qemu_args=args, timeout=600, memory="1G")
        finally:
            stop_process(proc)
    if result.exit_status != 0:
        raise RuntimeError(result.serial[-3000:])
    t0, t1, t2 = (float(x) for x in result.output.split())
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mib", type=int, default=32)
    args = parser.parse_args()
    guest_image()
    print("| round | offloads | eth1 → eth0 Mbit/s | eth0 → eth1 Mbit/s |")
    print("|---|---|---:|---:|")
    bits = args.mib * 8 * 1024 * 1024 / 1e6
    for r in range(1, args.rounds + 1):
        for name, (flags, second) in CASES.items():
            a, b = run_case(flags, second, args.mib)
            print(f"| {r} | {name} | {bits / a:.0f} | {bits / b:.0f} |", flush=True)


if __name__ == "__main__":
    main()
