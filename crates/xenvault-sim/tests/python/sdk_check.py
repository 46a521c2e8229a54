#!/usr/bin/env python3
"""Drives xapi-sim with the official Python XenAPI SDK over XML-RPC.

Usage: sdk_check.py URL CONTROL_URL USER PASSWORD HTTPS_URL FINGERPRINT
Each step is asserted; the script prints "OK <step>" lines and exits 0 only
if all passed.
"""
import hashlib
import json
import ssl
import sys
import time
import urllib.request
import xmlrpc.client

import XenAPI


def step(name):
    print("OK", name, flush=True)


def expect_failure(fn, code):
    try:
        fn()
    except XenAPI.Failure as f:
        assert f.details[0] == code, f"expected {code}, got {f.details}"
        return f.details
    raise AssertionError(f"expected XenAPI.Failure {code}, got success")


def main():
    url, control, user, password, https_url, fingerprint = sys.argv[1:7]
    s = XenAPI.Session(url)
    s.xenapi.login_with_password(user, password, "2.21", "xenvault-sdk-check")
    x = s.xenapi
    step("login")

    # A wrong password surfaces as SESSION_AUTHENTICATION_FAILED [user, msg].
    bad = XenAPI.Session(url)
    d = expect_failure(lambda: bad.xenapi.login_with_password(user, "wrong"), "SESSION_AUTHENTICATION_FAILED")
    assert d[1] == user, d
    step("bad password")

    records = x.VM.get_all_records()
    assert any(r["is_control_domain"] for r in records.values()), "dom0 missing"
    assert any(r["is_default_template"] for r in records.values()), "default templates missing"
    vms = {
        ref: r
        for ref, r in records.items()
        if not r["is_control_domain"] and not r["is_a_template"] and not r["is_a_snapshot"]
    }
    assert len(vms) >= 2, f"expected VMs, got {len(vms)}"
    for r in vms.values():
        # ints arrive as strings over XML-RPC; they must parse.
        assert int(r["memory_static_max"]) > 0
        assert isinstance(r["tags"], list)
    step(f"list VMs ({len(vms)})")

    running = [ref for ref, r in vms.items() if r["power_state"] == "Running"]
    halted = [ref for ref, r in vms.items() if r["power_state"] == "Halted"]
    assert running and halted, "expected running and halted VMs"
    vm = running[0]
    vm_vdis = set()
    for vbd in x.VM.get_VBDs(vm):
        if x.VBD.get_type(vbd) == "Disk":
            vm_vdis.add(x.VBD.get_VDI(vbd))
    assert vm_vdis, "VM has no disks"

    snap = x.VM.snapshot(vm, "sdk-snapshot")
    rec = x.VM.get_record(snap)
    assert rec["is_a_snapshot"] is True and rec["is_a_template"] is True, rec
    assert rec["snapshot_of"] == vm, rec
    assert rec["power_state"] == "Halted", rec
    assert rec["snapshot_info"]["power-state-at-snapshot"] == "Running", rec["snapshot_info"]
    assert snap in x.VM.get_snapshots(vm)
    snap_vdis = []
    for vbd in rec["VBDs"]:
        if x.VBD.get_type(vbd) == "Disk":
            v = x.VBD.get_VDI(vbd)
            vr = x.VDI.get_record(v)
            assert vr["is_a_snapshot"] is True and vr["snapshot_of"] in vm_vdis, vr
            snap_vdis.append(v)
    assert len(snap_vdis) == len(vm_vdis)
    step("VM.snapshot")

    # ignore_vdis (third parameter) leaves the disk out.
    snap2 = x.VM.snapshot(vm, "sdk-snapshot-2", list(vm_vdis))
    assert not [b for b in x.VM.get_VBDs(snap2) if x.VBD.get_type(b) == "Disk"]
    x.VM.destroy(snap2)
    step("VM.snapshot ignore_vdis")

    x.VM.set_is_a_template(snap, False)
    assert x.VM.get_is_a_template(snap) is False
    step("set is_a_template false")

    x.VM.destroy(snap)
    expect_failure(lambda: x.VM.get_record(snap), "HANDLE_INVALID")
    for v in snap_vdis:
        x.VDI.get_record(v)  # VM.destroy leaves VDIs
        x.VDI.destroy(v)
        d = expect_failure(lambda: x.VDI.get_record(v), "HANDLE_INVALID")
        assert d[1:] == ["VDI", v], d
    all_vdis = x.VDI.get_all()
    assert not set(snap_vdis) & set(all_vdis)
    step("destroy snapshot and its VDIs")

    task = x.Async.VM.clone(halted[0], "sdk-clone")
    assert task.startswith("OpaqueRef:"), task
    deadline = time.time() + 20
    while x.task.get_status(task) in ("pending", "cancelling"):
        assert time.time() < deadline, "task did not finish"
        time.sleep(0.1)
    trec = x.task.get_record(task)
    assert trec["status"] == "success", trec
    assert float(trec["progress"]) == 1.0, trec
    (clone,), _ = xmlrpc.client.loads(
        "<methodResponse><params><param>" + trec["result"] + "</param></params></methodResponse>"
    )
    assert x.VM.get_name_label(clone) == "sdk-clone"
    assert x.VM.get_is_a_snapshot(clone) is False
    x.task.destroy(task)
    expect_failure(lambda: x.task.get_record(task), "HANDLE_INVALID")
    step("Async.VM.clone + task")

    # An async call that fails reports through the task.
    task = x.Async.VM.clone(running[0], "must-fail")
    deadline = time.time() + 20
    while x.task.get_status(task) == "pending":
        assert time.time() < deadline
        time.sleep(0.1)
    info = x.task.get_error_info(task)
    assert x.task.get_status(task) == "failure" and info[0] == "VM_BAD_POWER_STATE", info
    assert info[2:] == ["halted", "running"], info
    x.task.destroy(task)
    step("Async failure via task")

    d = expect_failure(lambda: x.VM.get_record("OpaqueRef:00000000-0000-0000-0000-000000000000"), "HANDLE_INVALID")
    assert d[1] == "VM", d
    expect_failure(lambda: x.VM.snapshot_with_quiesce(vm, "q"), "MESSAGE_REMOVED")
    d = expect_failure(lambda: x.VM.get_by_uuid("nope"), "UUID_INVALID")
    step("errors as XenAPI.Failure")

    x.VM.add_to_other_config(vm, "xenvault", "1")
    expect_failure(lambda: x.VM.add_to_other_config(vm, "xenvault", "2"), "MAP_DUPLICATE_KEY")
    x.VM.remove_from_other_config(vm, "xenvault")
    x.VM.add_tags(vm, "sdk")
    assert "sdk" in x.VM.get_tags(vm)
    found = x.VM.get_all_records_where('field "is_control_domain"="false" and field "name__label"="%s"' % rec["name_label"].replace("sdk-snapshot", x.VM.get_name_label(vm)))
    assert vm in found, found
    step("other_config, tags, get_all_records_where")

    hosts = json.load(urllib.request.urlopen(control + "/hosts"))["hosts"]
    member = [h for h in hosts if not h["coordinator"]]
    assert member, "no member host"
    m = XenAPI.Session(member[0]["url"])
    d = expect_failure(lambda: m.xenapi.login_with_password(user, password), "HOST_IS_SLAVE")
    assert url.endswith("//" + d[1]), (url, d)
    step("HOST_IS_SLAVE from a member")

    # HTTPS: the certificate is the one announced, and the SDK logs in over TLS.
    host, port = https_url.split("//")[1].rsplit(":", 1)
    pem = ssl.get_server_certificate((host, int(port)))
    got = "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    assert got == fingerprint, (got, fingerprint)
    t = XenAPI.Session(https_url, ignore_ssl=True)
    t.xenapi.login_with_password(user, password, "2.21", "xenvault-sdk-check")
    assert vm in t.xenapi.VM.get_all()
    t.xenapi.session.logout()
    step("HTTPS with the announced certificate")

    s.xenapi.session.logout()
    step("logout")


if __name__ == "__main__":
    main()
