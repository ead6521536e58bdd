# Client PCs as network namespaces, for the bench scripts that run as root (sourced, not run).
# shellcheck shell=bash
# The script sets `tag` (unique to the run), `net` (10.NET.I.0/30 is PC I's link) and `pc` (a
# letter keeping its names apart from another script's). PC I is the namespace `sa<pc><tag>-I`,
# joined to this one by a veth pair: `s<pc>h<tag>I` here (10.NET.I.1), `s<pc>n<tag>I` inside
# (10.NET.I.2). A blackhole route keeps its address off the default route while its link is down.

pc_ns() { echo "sa$pc$tag-$1"; }
pc_if() { echo "s${pc}n$tag$1"; }
pc_host() { echo "s${pc}h$tag$1"; }

add_pc() { # I
  local ns h n
  ns=$(pc_ns "$1"); h=$(pc_host "$1"); n=$(pc_if "$1")
  ip netns add "$ns"
  ip link add "$h" type veth peer name "$n"
  ip link set "$n" netns "$ns"
  ip addr add "10.$net.$1.1/30" dev "$h"; ip link set "$h" up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" ip addr add "10.$net.$1.2/30" dev "$n"
  ip netns exec "$ns" ip link set "$n" up
  ip route add blackhole "10.$net.$1.0/30" metric 4000
}

del_pc() { # I (whatever of it exists)
  ip netns del "$(pc_ns "$1")" 2>/dev/null || true
  ip link del "$(pc_host "$1")" 2>/dev/null || true
  ip route del blackhole "10.$net.$1.0/30" metric 4000 2>/dev/null || true
}
