"""The plugin protocol without root: env and config validation, error codes."""

from __future__ import annotations

import json

import pytest

from cni import skel
from cni.errors import CNIError
from cni.spec import SUPPORTED_VERSIONS, parse_cni_args, parse_request

CONF = {"cniVersion": "1.1.0", "name": "net1", "type": "kproxy-bridge", "ipam": {"type": "kproxy-host-local"}}
ADD_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/var/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
}


class Refuser:
    """A plugin that must never be reached: validation has to stop first."""

    def __getattr__(self, name: str):  # noqa: ANN204
        raise AssertionError(f"plugin.{name} called although the request is invalid")


def code_of(env: dict[str, str], stdin: bytes) -> int:
    out, status = skel.dispatch(Refuser(), env, stdin)  # type: ignore[arg-type]
    assert status == 1 and out is not None
    assert set(out) >= {"cniVersion", "code", "msg"}
    return int(out["code"])


def test_version_lists_every_supported_version() -> None:
    out, status = skel.dispatch(Refuser(), {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')  # type: ignore[arg-type]
    assert status == 0
    assert out == {"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]}
    assert list(SUPPORTED_VERSIONS) == ["1.0.0", "1.1.0"]


@pytest.mark.parametrize("missing", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH", "CNI_COMMAND"])
def test_add_without_a_required_variable_is_code_4(missing: str) -> None:
    env = {k: v for k, v in ADD_ENV.items() if k != missing}
    assert code_of(env, json.dumps(CONF).encode()) == 4


def test_del_may_lack_netns_and_gc_status_need_only_path() -> None:
    deleted = parse_request({**ADD_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, json.dumps(CONF).encode())
    assert (deleted.command, deleted.container_id, deleted.netns, deleted.ifname) == ("DEL", "c1", "", "eth0")
    for command in ("GC", "STATUS"):
        request = parse_request({"CNI_COMMAND": command, "CNI_PATH": "/x:/y"}, json.dumps(CONF).encode())
        assert (request.command, request.container_id, request.path) == (command, "", ["/x", "/y"])


def test_malformed_json_is_code_6() -> None:
    assert code_of(ADD_ENV, b'{"cniVersion": "1.1.0", ') == 6
    assert code_of(ADD_ENV, b"[1, 2]") == 6


def test_unknown_cni_version_is_code_1() -> None:
    assert code_of(ADD_ENV, json.dumps({**CONF, "cniVersion": "0.3.1"}).encode()) == 1
    assert code_of(ADD_ENV, json.dumps({**CONF, "cniVersion": "9.9.9"}).encode()) == 1


def test_gc_and_status_need_spec_1_1() -> None:
    old = json.dumps({**CONF, "cniVersion": "1.0.0"}).encode()
    assert code_of({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}, old) == 1
    assert code_of({"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"}, old) == 1


def test_unknown_command_is_code_4() -> None:
    assert code_of({**ADD_ENV, "CNI_COMMAND": "EXPLODE"}, json.dumps(CONF).encode()) == 4


@pytest.mark.parametrize(
    "container_id",
    ["../../etc/passwd", "a/b", "..", "x\0y", "$(reboot)", "a;rm -rf /", "a b", "-leading-dash", ""],
)
def test_hostile_container_ids_are_refused(container_id: str) -> None:
    env = {**ADD_ENV, "CNI_CONTAINERID": container_id}
    assert code_of(env, json.dumps(CONF).encode()) == 4


@pytest.mark.parametrize("ifname", ["../eth0", "eth/0", "eth0:1", "e th0", "a" * 16, ".", "..", "eth\0"])
def test_hostile_ifnames_are_refused(ifname: str) -> None:
    assert code_of({**ADD_ENV, "CNI_IFNAME": ifname}, json.dumps(CONF).encode()) == 4


@pytest.mark.parametrize("name", ["../net", "net/1", "..", "n$(id)", "n\0", ""])
def test_hostile_network_names_are_code_7(name: str) -> None:
    assert code_of(ADD_ENV, json.dumps({**CONF, "name": name}).encode()) == 7


def test_config_without_name_or_type_is_code_7() -> None:
    assert code_of(ADD_ENV, json.dumps({"cniVersion": "1.1.0", "type": "x"}).encode()) == 7
    assert code_of(ADD_ENV, json.dumps({"cniVersion": "1.1.0", "name": "n"}).encode()) == 7


def test_cni_args_are_parsed_and_malformed_ones_refused() -> None:
    assert parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web-1") == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web-1"}
    with pytest.raises(CNIError) as err:
        parse_cni_args("novalue")
    assert err.value.code == 4


def test_an_unexpected_exception_still_answers_json() -> None:
    class Broken:
        def add(self, req):  # noqa: ANN001, ANN201
            raise RuntimeError("boom")

    out, status = skel.dispatch(Broken(), ADD_ENV, json.dumps(CONF).encode())  # type: ignore[arg-type]
    assert status == 1 and out is not None
    assert out["code"] == 999 and "boom" in str(out["msg"])
