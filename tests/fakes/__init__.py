"""Stateful fakes shared by the tests, one per I/O boundary (style.md habit 9).

    clock.py      FakeClock: a monotonic clock the test moves by hand
    netlink.py    FakeNetlink (routes), FakeTunnelKernel (vxlan.calico, tunl0, FDB, neighbours)
    iptables.py   FakeIptables (iptables-{save,restore}), FakeIpset (ipset save/restore/destroy)
    dataplane.py  FakeDataplane: the agent's real drivers over the fakes above

A fake keeps state the way the kernel does and refuses what the kernel refuses; tests assert on
that state. Every fake has a real-kernel counterpart test under tests/integration/.
"""
