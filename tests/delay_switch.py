"""A userspace IPv4 switch between TUN devices that delays packets bound for chosen
addresses: the tests' stand-in for `tc qdisc add ... netem delay` on kernels built
without sch_netem.

    python delay_switch.py TUN=ADDRESS[:delayed] ...

Creates each TUN device (the caller moves it into a namespace and gives it ADDRESS),
prints "ready", then forwards every IPv4 packet to the device that holds its destination
address: at once, or after the delay when the destination is marked :delayed. A line
"delay MS" on stdin sets the delay (0 at start); end of stdin ends the switch, and the
devices vanish with it. Its own cost is a few tens of microseconds per packet.
"""

import collections
import fcntl
import os
import select
import socket
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65536


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main(specs: list[str]) -> None:
    routes: dict[bytes, int] = {}  # destination address -> device fd
    delayed: set[bytes] = set()
    devices = []
    for spec in specs:
        name, target = spec.split("=")
        address, _, mark = target.partition(":")
        fd = open_tun(name)
        devices.append(fd)
        routes[socket.inet_aton(address)] = fd
        if mark == "delayed":
            delayed.add(socket.inet_aton(address))
    poller = select.epoll()
    for fd in devices:
        poller.register(fd, select.EPOLLIN)
    poller.register(sys.stdin.fileno(), select.EPOLLIN)
    print("ready", flush=True)

    delay = 0.0
    queue: collections.deque = collections.deque()  # (due time, fd, packet); one delay, so FIFO
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else -1
        for fd, _ in poller.poll(timeout):
            if fd == sys.stdin.fileno():
                commands = os.read(fd, 4096).decode()
                if not commands:
                    return
                for line in commands.splitlines():
                    delay = float(line.split()[1]) / 1000
                    print(f"delay {delay * 1000:g} ms", flush=True)
                continue
            while True:
                try:
                    packet = os.read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                if len(packet) < 20 or packet[0] >> 4 != 4:
                    continue  # not IPv4 (e.g. IPv6 router solicitations)
                destination = packet[16:20]
                out = routes.get(destination)
                if out is None:
                    continue
                if delay and destination in delayed:
                    queue.append((time.monotonic() + delay, out, packet))
                else:
                    os.write(out, packet)
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, out, packet = queue.popleft()
            os.write(out, packet)


if __name__ == "__main__":
    main(sys.argv[1:])
