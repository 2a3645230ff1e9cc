"""A lab's saved state: what `lab up` records and reads back."""

from __future__ import annotations

from kproxy.lab.state import LabState

RAW = {"name": "demo", "overlay": "vxlan", "pod_cidr": "10.244.0.0/16", "node_cidr": "172.18.0.0/24",
       "external_ip": "172.18.0.254", "mode": "ipvs", "nodes": {}, "pods": {}, "topology": {}, "generation": 3}


def test_the_state_reads_back_what_it_wrote() -> None:
    state = LabState.from_json({**RAW, "mode_options": {"scheduler": "sh"}})
    assert state.mode_options == {"scheduler": "sh"}
    assert LabState.from_json(state.to_json()) == state


def test_a_lab_from_before_mode_options_keeps_its_ipvs_scheduler() -> None:
    assert LabState.from_json({**RAW, "ipvs_scheduler": "lc"}).mode_options == {"scheduler": "lc"}
    assert LabState.from_json({**RAW, "ipvs_scheduler": ""}).mode_options == {}
