"""Host names and addresses, apart from config.py so that a worker checks its --bind without
importing yaml (a config's loader; ~20 ms of each worker's start)."""

import ipaddress


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
