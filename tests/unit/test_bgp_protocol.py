"""bgp.protocol: ExaBGP commands, ExaBGP JSON → events (verbatim lines from exabgp-notes), socket codec."""

from __future__ import annotations

import pytest

from bgp.protocol import (Ack, Attributes, CommandOutput, CommandResult, EndOfRib, Notification, OpenReceived,
                          PathAttributes, ProtocolError, ReceivedRoute, ReplayDone, RoutesReceived, StateChange,
                          announce_route, announce_routes, decode_command, decode_event, encode_command,
                          encode_event, end_of_rib, parse_exabgp_line, route_refresh, withdraw_route,
                          withdraw_routes)

HEAD = ('{ "exabgp": "5.0.0", "time": 1795445456.5, "host" : "vm", "pid" : 27476, "ppid" : 27474, "counter": 4, '
        '"type": "%s", "neighbor": { "address": { "local": "192.0.2.12", "peer": "192.0.2.1" }, '
        '"asn": { "local": 64512, "peer": 64512 }, "router-id": "192.0.2.12" , %s } }')

ANNOUNCE = HEAD % ("update", '"direction": "receive", "message": { "update": { "attribute": { "origin": "igp", '
                   '"local-preference": 100, "originator-id": "192.0.2.11", "cluster-list": [ "192.0.2.1" ] }, '
                   '"announce": { "ipv4 unicast": { "192.0.2.11": [ { "nlri": "10.244.1.0/26" } ] } } } }')
WITHDRAW = HEAD % ("update", '"direction": "receive", "message": { "update": { "withdraw": { "ipv4 unicast": '
                   '[ { "nlri": "10.244.2.0/26" } ] } } }')
EOR = HEAD % ("update", '"direction": "receive", "message": { "eor": { "afi" : "ipv4", "safi" : "unicast" } }')
UP = HEAD % ("state", '"state": "up"')
DOWN = HEAD % ("state", '"state": "down", "reason": "notification received (6,2)"')
OPEN = HEAD % ("open", '"direction": "receive", "open": { "version": 4, "asn": 64512, "hold_time": 240, '
               '"router_id": "192.0.2.1", "capabilities": { "1": { "name": "multiprotocol", "families": '
               '[ "ipv4/unicast" ] }, "64": { "name": "graceful restart", "time": 120, "address-family-flags": '
               '{ "ipv4/unicast": [ ] }, "restart-flags": [ ]  }, "65": { "name": "asn4", "asn4": 64512 } } }')
SHUTDOWN = ('{ "exabgp": "5.0.0", "time": 1795445963.2, "host" : "vm", "pid" : 27472, "ppid" : 27471, '
            '"type": "notification", "notification": "shutdown" }')


def test_commands():
    assert announce_route("10.244.1.0/26", "192.0.2.11") == "announce route 10.244.1.0/26 next-hop 192.0.2.11"
    assert (announce_route("10.244.1.0/26", "192.0.2.11", neighbor="192.0.2.1",
                           attributes=Attributes(local_preference=200, med=5, communities=("64512:1",),
                                                 as_path=(65001,)))
            == "neighbor 192.0.2.1 announce route 10.244.1.0/26 next-hop 192.0.2.11 local-preference 200 med 5 "
               "community [ 64512:1 ] as-path [ 65001 ]")
    assert withdraw_route("10.244.1.0/26") == "withdraw route 10.244.1.0/26"
    assert end_of_rib() == "announce eor ipv4 unicast"
    assert end_of_rib(neighbor="192.0.2.1") == "neighbor 192.0.2.1 announce eor ipv4 unicast"
    assert route_refresh() == "announce route-refresh ipv4 unicast"


def test_batched_commands_split_by_batch_size():
    prefixes = [f"10.0.{i}.0/24" for i in range(5)]
    lines = announce_routes(prefixes, "192.0.2.11", batch_size=2)
    assert lines == ["announce attributes next-hop 192.0.2.11 nlri 10.0.0.0/24 10.0.1.0/24",
                     "announce attributes next-hop 192.0.2.11 nlri 10.0.2.0/24 10.0.3.0/24",
                     "announce attributes next-hop 192.0.2.11 nlri 10.0.4.0/24"]
    assert withdraw_routes(prefixes[:1], "192.0.2.11") == ["withdraw attributes next-hop 192.0.2.11 nlri 10.0.0.0/24"]
    assert announce_routes([], "192.0.2.11") == []


@pytest.mark.parametrize("bad", [lambda: announce_route("10.0.0.1/24", "192.0.2.1"),
                                 lambda: announce_route("10.0.0.0/33", "192.0.2.1"),
                                 lambda: announce_route("10.0.0.0/24", "nexthop"),
                                 lambda: withdraw_route("10.0.0.0/24", neighbor="x"),
                                 lambda: announce_route("10.0.0.0/24", "192.0.2.1",
                                                        attributes=Attributes(communities=("bad",)))])
def test_invalid_command_values(bad):
    with pytest.raises(ValueError):
        bad()


def test_parse_update_announce_with_reflector_attributes():
    event = parse_exabgp_line(ANNOUNCE)
    assert event == RoutesReceived("192.0.2.1", (ReceivedRoute("10.244.1.0/26", "192.0.2.11", PathAttributes(
        origin="igp", local_preference=100, originator_id="192.0.2.11", cluster_list=("192.0.2.1",))),),
        (), 1795445456.5)


def test_parse_withdraw_eor_states_open_notification_acks():
    assert parse_exabgp_line(WITHDRAW) == RoutesReceived("192.0.2.1", (), ("10.244.2.0/26",), 1795445456.5)
    assert parse_exabgp_line(EOR) == EndOfRib("192.0.2.1", 1795445456.5)
    assert parse_exabgp_line(UP) == StateChange("192.0.2.1", "192.0.2.12", 64512, 64512, "up", None, 1795445456.5)
    down = parse_exabgp_line(DOWN)
    assert isinstance(down, StateChange) and down.reason == "notification received (6,2)"
    assert parse_exabgp_line(OPEN) == OpenReceived("192.0.2.1", "192.0.2.1", 64512, 240, 120, 1795445456.5)
    assert parse_exabgp_line(SHUTDOWN) == Notification("shutdown", 1795445963.2)
    assert parse_exabgp_line("done\n") == Ack(True)
    assert parse_exabgp_line("error\n") == Ack(False)
    assert parse_exabgp_line("192.0.2.1 ipv4 unicast 10.0.0.0/24 next-hop 192.0.2.1") == \
        CommandOutput("192.0.2.1 ipv4 unicast 10.0.0.0/24 next-hop 192.0.2.1")


def test_open_without_graceful_restart_for_ipv4():
    no_gr = OPEN.replace('"ipv4/unicast": [ ] }', '"ipv6/unicast": [ ] }')
    event = parse_exabgp_line(no_gr)
    assert isinstance(event, OpenReceived) and event.graceful_restart_time is None


def test_as_path_med_communities_and_compact_nlri():
    line = HEAD % ("update", '"direction": "receive", "message": { "update": { "attribute": { "origin": "egp", '
                   '"as-path": { "0": { "element": "as-sequence", "value": [ 65001, 65002 ] }, '
                   '"1": { "element": "as-set", "value": [ 65003, 65004 ] } }, "med": 7, "community": [ [ 64512, 1 ] ] }, '
                   '"announce": { "ipv4 unicast": { "192.0.2.1": [ "10.9.0.0/16" ] } } } }')
    event = parse_exabgp_line(line)
    assert isinstance(event, RoutesReceived)
    (route,) = event.announced
    assert route.prefix == "10.9.0.0/16"
    assert route.attributes == PathAttributes(origin="egp", med=7, as_path=(65001, 65002, 65003), communities=("64512:1",))


def test_sent_messages_and_unknown_types_are_ignored():
    assert parse_exabgp_line(ANNOUNCE.replace('"receive"', '"send"')) is None
    assert parse_exabgp_line(HEAD % ("keepalive", '"direction": "receive"')) is None


def test_malformed_json_raises_protocol_error():
    with pytest.raises(ProtocolError):
        parse_exabgp_line('{ "type": "state" }')
    with pytest.raises(ProtocolError):
        parse_exabgp_line("{ not json")


@pytest.mark.parametrize("line", [ANNOUNCE, WITHDRAW, EOR, UP, DOWN, OPEN, SHUTDOWN])
def test_socket_codec_round_trips_every_event(line):
    event = parse_exabgp_line(line)
    assert event is not None
    encoded = encode_event(event)
    assert "\n" not in encoded
    assert decode_event(encoded) == event


def test_socket_codec_results_and_commands():
    for event in (CommandResult(3, False, ("a", "b")), ReplayDone()):
        assert decode_event(encode_event(event)) == event
    with pytest.raises(ValueError):
        encode_event(Ack(True))
    assert decode_command(encode_command(7, "withdraw route 10.0.0.0/24")) == (7, "withdraw route 10.0.0.0/24")
    with pytest.raises(ValueError):
        encode_command(1, "a\nb")
    with pytest.raises(ProtocolError):
        decode_command('{"id": "x"}')
    with pytest.raises(ProtocolError):
        decode_event('{"type": "nope"}')
