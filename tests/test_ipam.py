"""host-local IPAM in-process: ranges, the on-disk layout, DEL, GC, STATUS, CHECK.

These need no root: the store is plain files in a temporary dataDir.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cni.errors import CNIError
from cni.ipam import HostLocal, parse_ipam_config
from cni.spec import Request


def request(data_dir: Path, command: str = "ADD", cid: str = "c1", ifname: str = "eth0", **ipam: Any) -> Request:
    ipam_conf = {"type": "kproxy-host-local", "ranges": [[{"subnet": "10.10.0.0/29"}]], "dataDir": str(data_dir)}
    ipam_conf.update(ipam)
    config = {"cniVersion": "1.1.0", "name": "net1", "type": "kproxy-bridge", "ipam": ipam_conf}
    return Request(command=command, config=config, stdin=json.dumps(config).encode(),
                   container_id=cid, ifname=ifname, netns="/x")


def addresses(result: dict[str, Any]) -> list[str]:
    return [ip["address"] for ip in result["ips"]]


def test_first_address_skips_the_gateway_and_the_file_layout_matches_the_reference(tmp_path: Path) -> None:
    result = HostLocal().add(request(tmp_path))
    assert result["ips"] == [{"address": "10.10.0.2/29", "gateway": "10.10.0.1"}]
    net = tmp_path / "net1"
    assert (net / "10.10.0.2").read_bytes() == b"c1\r\neth0"
    assert (net / "last_reserved_ip.0").read_text() == "10.10.0.2"
    assert (net / "lock").exists()


def test_round_robin_continues_after_the_last_reserved_address(tmp_path: Path) -> None:
    ipam = HostLocal()
    assert addresses(ipam.add(request(tmp_path, cid="a"))) == ["10.10.0.2/29"]
    assert addresses(ipam.add(request(tmp_path, cid="b"))) == ["10.10.0.3/29"]
    ipam.delete(request(tmp_path, "DEL", cid="a"))
    # .2 is free again, but round robin hands out .4 first, like the reference.
    assert addresses(ipam.add(request(tmp_path, cid="c"))) == ["10.10.0.4/29"]


def test_exhausted_range_is_a_clear_error(tmp_path: Path) -> None:
    ipam = HostLocal()
    for i in range(5):  # /29: .2 .. .6 (.1 is the gateway, .7 broadcast)
        ipam.add(request(tmp_path, cid=f"c{i}"))
    with pytest.raises(CNIError) as err:
        ipam.add(request(tmp_path, cid="one-too-many"))
    assert err.value.code == 100
    assert "no IP addresses available in range set: 10.10.0.1-10.10.0.6" in err.value.msg
    with pytest.raises(CNIError) as status:
        ipam.status(request(tmp_path, "STATUS"))
    assert status.value.code == 50


def test_repeated_add_for_the_same_container_and_ifname_is_refused(tmp_path: Path) -> None:
    ipam = HostLocal()
    ipam.add(request(tmp_path))
    with pytest.raises(CNIError) as err:
        ipam.add(request(tmp_path))
    assert err.value.code == 101 and "already has address 10.10.0.2" in err.value.msg
    # Another interface of the same container is a different attachment.
    assert addresses(ipam.add(request(tmp_path, ifname="net1"))) == ["10.10.0.3/29"]


def test_del_frees_by_container_and_ifname_and_is_idempotent(tmp_path: Path) -> None:
    ipam = HostLocal()
    ipam.add(request(tmp_path, cid="keep"))
    ipam.add(request(tmp_path, cid="drop"))
    ipam.delete(request(tmp_path, "DEL", cid="drop"))
    ipam.delete(request(tmp_path, "DEL", cid="drop"))
    ipam.delete(request(tmp_path, "DEL", cid="never-added"))
    assert sorted(p.name for p in (tmp_path / "net1").iterdir() if p.name[0].isdigit()) == ["10.10.0.2"]


def test_gc_releases_everything_not_in_valid_attachments(tmp_path: Path) -> None:
    ipam = HostLocal()
    for cid in ("alive", "crashed-1", "crashed-2"):
        ipam.add(request(tmp_path, cid=cid))
    gc = request(tmp_path, "GC")
    gc.config["cni.dev/valid-attachments"] = [{"containerID": "alive", "ifname": "eth0"}]
    ipam.gc(gc)
    left = {p.name: p.read_bytes() for p in (tmp_path / "net1").iterdir() if p.name[0].isdigit()}
    assert left == {"10.10.0.2": b"alive\r\neth0"}


def test_gc_without_valid_attachments_releases_nothing(tmp_path: Path) -> None:
    ipam = HostLocal()
    ipam.add(request(tmp_path))
    with pytest.raises(CNIError) as err:
        ipam.gc(request(tmp_path, "GC"))
    assert err.value.code == 7
    assert (tmp_path / "net1" / "10.10.0.2").exists()


def test_check_finds_missing_allocations(tmp_path: Path) -> None:
    ipam = HostLocal()
    result = ipam.add(request(tmp_path))
    ok = request(tmp_path, "CHECK")
    ok.config["prevResult"] = result
    ipam.check(ok)
    (tmp_path / "net1" / "10.10.0.2").unlink()
    with pytest.raises(CNIError) as err:
        ipam.check(ok)
    assert err.value.code == 103


def test_several_range_sets_give_one_address_each(tmp_path: Path) -> None:
    sets = [[{"subnet": "10.10.0.0/29"}], [{"subnet": "10.20.0.0/29", "rangeStart": "10.20.0.5"}]]
    result = HostLocal().add(request(tmp_path, ranges=sets))
    assert addresses(result) == ["10.10.0.2/29", "10.20.0.5/29"]


def test_a_range_set_spans_ranges_in_order(tmp_path: Path) -> None:
    sets = [[{"subnet": "10.10.0.0/30"}, {"subnet": "10.10.1.0/30"}]]
    ipam = HostLocal()
    got = [addresses(ipam.add(request(tmp_path, cid=f"c{i}", ranges=sets)))[0] for i in range(2)]
    assert got == ["10.10.0.2/30", "10.10.1.2/30"]


@pytest.mark.parametrize(
    "ipam, message",
    [
        ({"ranges": [[{"subnet": "10.10.0.1/24"}]]}, "host bits set"),
        ({"ranges": [[{"subnet": "10.10.0.0/24", "rangeStart": "10.11.0.5"}]]}, "outside subnet"),
        ({"ranges": [[{"subnet": "10.10.0.0/24", "rangeStart": ".9", "rangeEnd": "10.10.0.2"}]]}, "not an IP address"),
        ({"ranges": [[{"subnet": "10.10.0.0/24", "rangeStart": "10.10.0.9", "rangeEnd": "10.10.0.2"}]]}, "after rangeEnd"),
        ({"ranges": [[{"subnet": "10.10.0.0/24"}, {"subnet": "10.10.0.0/25"}]]}, "overlap"),
        ({"ranges": []}, "non-empty"),
        ({"ranges": [[{"subnet": "10.10.0.0/24"}]], "dataDir": "relative/dir"}, "absolute"),
        ({"ranges": [[{"subnet": "10.10.0.0/24"}]], "routes": [{"gw": "10.10.0.1"}]}, "dst"),
    ],
)
def test_invalid_ipam_configs_are_code_7(tmp_path: Path, ipam: dict[str, Any], message: str) -> None:
    config = {"name": "n", "ipam": {"type": "kproxy-host-local", "dataDir": str(tmp_path), **ipam}}
    with pytest.raises(CNIError) as err:
        parse_ipam_config(config)
    assert err.value.code == 7 and message in err.value.msg


def test_the_single_subnet_form_still_works(tmp_path: Path) -> None:
    cfg = parse_ipam_config({"ipam": {"subnet": "10.1.2.0/24", "gateway": "10.1.2.254", "dataDir": str(tmp_path)}})
    (range_,) = cfg.range_sets[0]
    assert (str(range_.start), str(range_.end), str(range_.gateway)) == ("10.1.2.1", "10.1.2.254", "10.1.2.254")


def _allocate_one(args: tuple[str, int]) -> str:
    data_dir, i = args
    return addresses(HostLocal().add(request(Path(data_dir), cid=f"c{i}", ranges=[[{"subnet": "10.30.0.0/24"}]])))[0]


def test_concurrent_allocations_never_share_an_address(tmp_path: Path) -> None:
    with ProcessPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(_allocate_one, [(str(tmp_path), i) for i in range(100)]))
    assert len(set(got)) == 100
