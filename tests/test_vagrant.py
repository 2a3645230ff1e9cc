"""vagrant/Vagrantfile, checked by Vagrant itself (no VM is booted).

`vagrant validate --ignore-provider` runs Vagrant's own config validation
(box, synced folders, provisioners) with the providers mocked: neither
VirtualBox nor libvirt is installed here, and without the flag validate stops
at "No usable default provider". What the Vagrantfile asks of the providers
and the provisioner is then read back through Vagrant's Ruby API, the same
loader `vagrant up` uses, with the KPROXY_VM_* overrides set or not.

vagrant (and ruby with it) comes from scripts/setup. Nothing lands in the
repository or in ~: VAGRANT_HOME and the .vagrant data dir are temporary.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
VAGRANT_DIR = REPO / "vagrant"

# Loads the Vagrantfile as `vagrant up` would and prints what it configures.
# The root config, not a machine's: a machine's would need a usable provider.
SHOW_CONFIG = r"""
require "json"
require "vagrant"
env = Vagrant::Environment.new(cwd: Dir.pwd, local_data_path: ENV.fetch("VAGRANT_DOTFILE_PATH"))
vm = env.vagrantfile.config.vm
virtualbox = vm.get_provider_config(:virtualbox)
libvirt = vm.get_provider_config(:libvirt)  # vagrant-libvirt absent: Vagrant keeps the settings as given
puts JSON.generate(
  box: vm.box,
  synced_folders: vm.synced_folders.transform_values { |o| o.transform_keys(&:to_s).transform_values { |v| v.is_a?(Symbol) ? v.to_s : v } },
  provisioners: vm.provisioners.map { |p|
    {name: p.name.to_s, type: p.type.to_s, inline: p.config.inline, path: p.config.path,
     privileged: p.config.privileged}
  },
  virtualbox: {modifyvm: virtualbox.customizations.map { |_, argv| argv.map(&:to_s) }},
  libvirt: libvirt.instance_variables_hash,
)
"""


def vagrant_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KPROXY_VM_", "VAGRANT_"))}
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "dot").mkdir(exist_ok=True)
    env.update(
        VAGRANT_HOME=str(tmp_path / "home"),
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_NO_COLOR="1",
    )
    env.update(overrides)
    return env


def validate(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT_DIR,
                          env=vagrant_env(tmp_path, **overrides), capture_output=True, text=True, timeout=120)


def show_config(tmp_path: Path, **overrides: str) -> dict[str, Any]:
    done = subprocess.run(["ruby", "-e", SHOW_CONFIG], cwd=VAGRANT_DIR, env=vagrant_env(tmp_path, **overrides),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return show_config(tmp_path_factory.mktemp("vagrant"))


def test_vagrant_validates_the_vagrantfile(tmp_path: Path) -> None:
    done = validate(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout
    assert not (VAGRANT_DIR / ".vagrant").exists(), "validate must not leave Vagrant state in the repository"


def test_vm_is_debian_bookworm(default_config: dict[str, Any]) -> None:
    assert default_config["box"] == "debian/bookworm64"


def test_provisioning_is_scripts_setup_and_a_kproxy_link(default_config: dict[str, Any]) -> None:
    [setup] = default_config["provisioners"]
    assert setup["type"] == "shell" and setup["privileged"] is True and setup["path"] is None
    lines = [line.strip() for line in setup["inline"].splitlines() if line.strip()]
    assert lines == [
        "set -euo pipefail",
        "/vagrant/scripts/setup",  # the one install path, the same one scripts/test runs
        "ln -sfn /vagrant/.venv/bin/kproxy /usr/local/bin/kproxy",  # `sudo kproxy` in the VM
    ]
    # and /vagrant/scripts/setup is this repository's scripts/setup:
    assert (REPO / "scripts" / "setup").is_file() and os.access(REPO / "scripts" / "setup", os.X_OK)


def test_the_repository_is_synced_without_the_hosts_venv(default_config: dict[str, Any]) -> None:
    folders = default_config["synced_folders"]
    active = {guest: opts for guest, opts in folders.items() if not opts.get("disabled")}
    assert list(active) == ["/vagrant"]
    share = active["/vagrant"]
    assert Path(share["hostpath"]) == REPO
    assert share["type"] == "rsync"
    assert ".venv/" in share["rsync__exclude"]


def test_default_size(default_config: dict[str, Any]) -> None:
    assert default_config["libvirt"] == {"cpus": 2, "memory": 4096}
    assert default_config["virtualbox"]["modifyvm"] == [["modifyvm", "id", "--cpus", "2"],
                                                       ["modifyvm", "id", "--memory", "4096"]]


def test_size_overrides_reach_both_providers(tmp_path: Path) -> None:
    config = show_config(tmp_path, KPROXY_VM_CPUS="3", KPROXY_VM_MEMORY="2048")
    assert config["libvirt"] == {"cpus": 3, "memory": 2048}
    assert config["virtualbox"]["modifyvm"] == [["modifyvm", "id", "--cpus", "3"],
                                               ["modifyvm", "id", "--memory", "2048"]]
    assert validate(tmp_path, KPROXY_VM_CPUS="3", KPROXY_VM_MEMORY="2048").returncode == 0


@pytest.mark.parametrize("name,value", [("KPROXY_VM_CPUS", "two"), ("KPROXY_VM_CPUS", "0"),
                                        ("KPROXY_VM_MEMORY", "512"), ("KPROXY_VM_MEMORY", "4G")])
def test_bad_size_overrides_are_refused(tmp_path: Path, name: str, value: str) -> None:
    done = validate(tmp_path, **{name: value})
    assert done.returncode != 0
    assert f"{name}={value!r}".replace("'", '"') in done.stdout + done.stderr


# One machine's config, as `vagrant up` would load it for libvirt (absent here: usability not checked).
SHOW_MACHINES = r"""
require "json"
require "vagrant"
env = Vagrant::Environment.new(cwd: Dir.pwd, local_data_path: ENV.fetch("VAGRANT_DOTFILE_PATH"))
puts JSON.generate(env.machine_names.to_h { |name|
  vm = env.vagrantfile.machine_config(name, :libvirt, env.boxes, nil, false)[:config].vm
  [name, {hostname: vm.hostname, lab_nics: vm.networks.select { |kind, _| kind == :private_network }.map { |_, o|
            o.slice(:auto_config, :mac, :libvirt__network_name, :libvirt__dhcp_enabled, :libvirt__forward_mode) },
          provisioners: vm.provisioners.map { |p| p.name.to_s },
          lab: vm.provisioners.select { |p| p.name.to_s == "kproxy-lab" }.map { |p| p.config.inline }}]
})
"""


def test_kproxy_vms_makes_that_many_vms_each_with_a_bare_lab_nic_on_one_network(tmp_path: Path) -> None:
    assert validate(tmp_path, KPROXY_VMS="2").returncode == 0
    done = subprocess.run(["ruby", "-e", SHOW_MACHINES], cwd=VAGRANT_DIR, env=vagrant_env(tmp_path, KPROXY_VMS="2"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    machines = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(machines) == ["kproxy-1", "kproxy-2"]
    for i, name in enumerate(machines, start=1):
        machine = machines[name]
        assert machine["hostname"] == name
        assert machine["lab_nics"] == [{"auto_config": False, "mac": f"52:54:00:6b:70:0{i}",
                                        "libvirt__network_name": "kproxy-lab", "libvirt__dhcp_enabled": False,
                                        "libvirt__forward_mode": "none"}]
        assert machine["provisioners"] == ["kproxy-setup", "kproxy-lab"]  # setup first: kproxy is installed
    [up] = machines["kproxy-1"]["lab"]
    assert "kproxy lab up -f /vagrant/examples/lab.yaml --store etcd --nic 52:54:00:6b:70:01" in up
    [join] = machines["kproxy-2"]["lab"]
    assert "printf 'name: kproxy\\nnodes: [vm2-node]\\npods: []\\n' > /run/kproxy-join.yaml" in join
    assert ("kproxy lab join -f /run/kproxy-join.yaml --store etcd://172.18.0.253:2379 --nic 52:54:00:6b:70:02 "
            "&& exit 0") in join


@pytest.mark.parametrize("value", ["0", "10", "two"])
def test_a_bad_number_of_vms_is_refused(tmp_path: Path, value: str) -> None:
    done = validate(tmp_path, KPROXY_VMS=value)
    assert done.returncode != 0 and "KPROXY_VMS=" in done.stdout + done.stderr
