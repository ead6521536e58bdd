#!/usr/bin/env python3
"""A sleeping PC for the Wake-on-LAN tests and bench/wake.sh.

Usage: wake-harness.py MAC DELAY READY_FILE -- COMMAND...

Listens for UDP on ports 9 and 7 (every address, broadcasts included), as a sleeping network
card looks at every frame. When a datagram holds the magic packet of MAC (6 bytes 0xFF, then
MAC 16 times) it says so on stderr, waits DELAY seconds (the PC booting) and becomes COMMAND
(exec: the same process, so whoever started the harness can stop the agent). MAC `deaf` never
matches: a PC whose Wake-on-LAN is off. READY_FILE is written once both ports are bound.
"""
import os
import select
import socket
import sys
import time


def main():
    mac_text, delay, ready = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    if sys.argv[4] != "--":
        sys.exit("usage: wake-harness.py MAC DELAY READY_FILE -- COMMAND...")
    command = sys.argv[5:]
    want = None
    if mac_text != "deaf":
        want = b"\xff" * 6 + bytes.fromhex(mac_text.replace(":", "")) * 16
    socks = []
    for port in (9, 7):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        socks.append(s)
    with open(ready, "w") as f:
        f.write("listening\n")
    while True:
        readable, _, _ = select.select(socks, [], [])
        for s in readable:
            data, src = s.recvfrom(4096)
            port = s.getsockname()[1]
            if want is not None and want in data:
                print(f"magic packet for {mac_text} from {src[0]} on port {port}; "
                      f"waking in {delay}s", file=sys.stderr, flush=True)
                time.sleep(delay)
                for x in socks:
                    x.close()
                os.execvp(command[0], command)
            print(f"ignored {len(data)} bytes from {src[0]} on port {port}",
                  file=sys.stderr, flush=True)


main()
