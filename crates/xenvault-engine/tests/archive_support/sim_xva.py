"""Oracle for archive_sim_import.rs: talks to xapi-sim with the official
XenAPI SDK and plain HTTP only (no xenvault code).

  sim_xva.py export URL USER PW OUT.xva  -> snapshot the first non-template VM,
      GET /export of the snapshot into OUT.xva; prints JSON {vm_uuid, vm_name,
      snapshot_uuid, disks: [{userdevice, sha256, size}]}
  sim_xva.py import URL USER PW IN.xva   -> PUT /import of IN.xva; prints JSON
      {vm_uuid, vm_name, disks: [...]} of the VM that appeared.
"""
import hashlib
import json
import sys
import time
import urllib.request

import XenAPI


def disks_of(x, sid, url, vm_ref):
    out = []
    for vbd in x.VM.get_VBDs(vm_ref):
        rec = x.VBD.get_record(vbd)
        if rec["type"] != "Disk" or rec["VDI"] == "OpaqueRef:NULL":
            continue
        vdi = x.VDI.get_record(rec["VDI"])
        h = hashlib.sha256()
        with urllib.request.urlopen(
            "%s/export_raw_vdi?session_id=%s&vdi=%s&format=raw" % (url, sid, vdi["uuid"])
        ) as r:
            while True:
                b = r.read(1 << 20)
                if not b:
                    break
                h.update(b)
        out.append({"userdevice": rec["userdevice"], "sha256": h.hexdigest(), "size": int(vdi["virtual_size"])})
    return sorted(out, key=lambda d: d["userdevice"])


def main():
    mode, url, user, pw, path = sys.argv[1:6]
    s = XenAPI.Session(url)
    s.xenapi.login_with_password(user, pw, "1.0", "archive-test")
    x = s.xenapi
    sid = s._session
    try:
        if mode == "export":
            vms = [
                (r, v)
                for r, v in x.VM.get_all_records().items()
                if not v["is_a_template"] and not v["is_control_domain"] and not v["is_a_snapshot"]
            ]
            vms.sort(key=lambda rv: rv[1]["name_label"])
            ref, vm = vms[0]
            snap = x.VM.snapshot(ref, "archive-test")
            x.VM.set_is_a_template(snap, False)
            snap_uuid = x.VM.get_uuid(snap)
            with urllib.request.urlopen("%s/export?session_id=%s&uuid=%s" % (url, sid, snap_uuid)) as r, open(path, "wb") as f:
                while True:
                    b = r.read(1 << 20)
                    if not b:
                        break
                    f.write(b)
            print(json.dumps({"vm_uuid": vm["uuid"], "vm_name": vm["name_label"], "snapshot_uuid": snap_uuid,
                              "disks": disks_of(x, sid, url, snap)}))
        else:
            before = set(x.VM.get_all())
            data = open(path, "rb").read()
            req = urllib.request.Request("%s/import?session_id=%s" % (url, sid), data=data, method="PUT")
            req.add_header("Content-Length", str(len(data)))
            urllib.request.urlopen(req).read()
            new = []
            for _ in range(100):
                new = [r for r in x.VM.get_all() if r not in before and not x.VM.get_is_a_snapshot(r)]
                if new:
                    break
                time.sleep(0.1)
            assert len(new) == 1, "expected one imported VM, found %r" % new
            print(json.dumps({"vm_uuid": x.VM.get_uuid(new[0]), "vm_name": x.VM.get_name_label(new[0]),
                              "disks": disks_of(x, sid, url, new[0])}))
    finally:
        s.xenapi.session.logout()


main()
