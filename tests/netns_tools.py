"""Linux network namespaces as separate hosts, for tests.

Host i is namespace llmtp-test-<pid>-<i>. Links are made only in 10.231.S.0/24 subnets
that no interface or route on this machine uses yet (S picked from the pid):
  bridge  one veth per namespace into a bridge in the root namespace; the root namespace
          (the coordinator) holds 10.231.S.1, host i holds 10.231.S.(i+2). Latency is added
          with `tc qdisc add dev <root-side veth> root netem delay D`: every packet into a
          worker waits D.
  switch  for kernels without sch_netem: a TUN device per host (and one for the root
          namespace), joined by tests/delay_switch.py, which delays packets into the workers.
Lab.close() removes every namespace, device, qdisc and process it made, after any failure.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

SUBNET_PREFIX = "10.231"
SWITCH_MTU = 65000
PONG_SERVER = """
import sys, zmq
socket = zmq.Context().socket(zmq.REP)
socket.bind(sys.argv[1])
print("ready", flush=True)
while True:
    socket.send(socket.recv())
"""
PING_CLIENT = """
import statistics, sys, time, zmq
socket = zmq.Context().socket(zmq.REQ)
socket.connect(sys.argv[1])
payload = bytes(int(sys.argv[3]))
times = []
for n in range(int(sys.argv[2]) + 20):
    started = time.perf_counter()
    socket.send(payload)
    socket.recv()
    times.append(time.perf_counter() - started)
print(statistics.median(times[20:]))
"""


class NetemUnavailable(Exception):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def namespaces_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for ip netns / veth / tc (run the tests as root, as CI does)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"llmtp-test-{os.getpid()}-probe"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode:
        return f"`ip netns add` failed: {result.stderr.strip() or result.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Lab:
    def __init__(self, n_hosts: int):
        self.n_hosts = n_hosts
        self.tag = f"lt{os.getpid()}"  # interface names: at most 15 characters
        self.namespaces: list[str] = []
        self.root_devices: list[str] = []  # made in the root namespace, deleted on close
        self.qdisc_devices: list[str] = []
        self.switch: subprocess.Popen | None = None
        self.bridge_addresses: tuple[str, list[str]] | None = None  # (coordinator, hosts)
        self.switch_addresses: tuple[str, list[str]] | None = None

    def namespace(self, index: int) -> str:
        return f"llmtp-test-{os.getpid()}-{index}"

    def exec_prefix(self, index: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(index)]

    def free_subnet(self) -> str:
        in_use = ip("-4", "-o", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout
        for offset in range(254):
            subnet = f"{SUBNET_PREFIX}.{(os.getpid() + offset) % 254 + 1}"
            if f"{subnet}." not in in_use:
                return subnet
        raise RuntimeError(f"no free {SUBNET_PREFIX}.x.0/24 subnet")

    def build_bridge(self) -> tuple[str, list[str]]:
        """Namespaces on a bridge: (coordinator address, host addresses)."""
        subnet = self.free_subnet()
        bridge = f"{self.tag}br"
        ip("link", "add", bridge, "type", "bridge")
        self.root_devices.append(bridge)
        ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        hosts = []
        for index in range(self.n_hosts):
            namespace, outside, inside = self.namespace(index), f"{self.tag}h{index}", f"{self.tag}n{index}"
            ip("netns", "add", namespace)
            self.namespaces.append(namespace)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self.root_devices.append(outside)
            ip("link", "set", inside, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{subnet}.{index + 2}/24", "dev", inside)
            ip("-n", namespace, "link", "set", inside, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("link", "set", outside, "master", bridge, "up")
            hosts.append(f"{subnet}.{index + 2}")
        self.bridge_addresses = (f"{subnet}.1", hosts)
        return self.bridge_addresses

    def add_netem_delay(self, milliseconds: float) -> None:
        """Delay every packet into each host by `milliseconds` (on the root-side veths)."""
        for index in range(self.n_hosts):
            device = f"{self.tag}h{index}"
            result = subprocess.run(["tc", "qdisc", "add", "dev", device, "root", "netem", "delay",
                                     f"{milliseconds}ms"], capture_output=True, text=True)
            if result.returncode:
                raise NetemUnavailable(result.stderr.strip() or f"tc exited with {result.returncode}")
            self.qdisc_devices.append(device)

    def remove_netem_delay(self) -> None:
        for device in self.qdisc_devices:
            subprocess.run(["tc", "qdisc", "del", "dev", device, "root"], capture_output=True)
        self.qdisc_devices = []

    def build_switch(self) -> tuple[str, list[str]]:
        """A TUN device per host plus one for the root namespace, joined by delay_switch.py."""
        subnet = self.free_subnet()
        root_device = f"{self.tag}tc"
        devices = [f"{self.tag}t{index}" for index in range(self.n_hosts)]
        hosts = [f"{subnet}.{index + 2}" for index in range(self.n_hosts)]
        specs = [f"{root_device}={subnet}.1"] + [f"{device}={host}:delayed" for device, host in zip(devices, hosts)]
        self.switch = subprocess.Popen([sys.executable, str(Path(__file__).with_name("delay_switch.py")), *specs],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.switch.stdout.readline().strip() != "ready":
            raise RuntimeError("delay_switch.py did not start")
        ip("addr", "add", f"{subnet}.1/24", "dev", root_device)
        ip("link", "set", root_device, "mtu", str(SWITCH_MTU), "up")
        for index, (device, host) in enumerate(zip(devices, hosts)):
            namespace = self.namespace(index)
            ip("link", "set", device, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{host}/24", "dev", device)
            ip("-n", namespace, "link", "set", device, "mtu", str(SWITCH_MTU), "up")
        self.switch_addresses = (f"{subnet}.1", hosts)
        return self.switch_addresses

    def set_switch_delay(self, milliseconds: float) -> None:
        self.switch.stdin.write(f"delay {milliseconds}\n")
        self.switch.stdin.flush()
        self.switch.stdout.readline()  # the switch's acknowledgement

    def zmq_rtt(self, server: int, client: int, server_address: str, count: int = 200,
                payload_bytes: int = 256) -> float:
        """Median seconds of a bare ZeroMQ REQ/REP round trip from host `client` to host `server`."""
        endpoint = f"tcp://{server_address}:{46000 + server}"
        pong = subprocess.Popen(self.exec_prefix(server) + [sys.executable, "-c", PONG_SERVER, endpoint],
                                stdout=subprocess.PIPE, text=True)
        try:
            if pong.stdout.readline().strip() != "ready":
                raise RuntimeError("ping-pong server did not start")
            result = subprocess.run(self.exec_prefix(client) + [sys.executable, "-c", PING_CLIENT, endpoint,
                                                                str(count), str(payload_bytes)],
                                    capture_output=True, text=True, timeout=60, check=True)
            return float(result.stdout)
        finally:
            pong.kill()
            pong.wait()

    def close(self) -> None:
        """Remove everything, whatever state a failure left it in."""
        self.remove_netem_delay()
        for namespace in self.namespaces:  # anything still running in our namespaces is ours
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
            for pid in pids.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        if self.switch is not None:
            self.switch.stdin.close()  # ends the switch; its TUN devices vanish with it
            try:
                self.switch.wait(5)
            except subprocess.TimeoutExpired:
                self.switch.kill()
                self.switch.wait()
            self.switch.stdout.close()
        for namespace in self.namespaces:
            ip("netns", "del", namespace, check=False)
        for device in self.root_devices:
            if ip("link", "show", device, check=False).returncode == 0:
                ip("link", "del", device, check=False)
        self.namespaces, self.root_devices, self.switch = [], [], None
