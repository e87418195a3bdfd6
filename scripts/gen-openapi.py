#!/usr/bin/env python3
"""Writes docs/openapi.json, the OpenAPI 3.0 description of Zebu's REST API (/v1).

The API's routes are listed in crates/zebu-manager/src/api.rs (ROUTES); a test fails when this
document and that list drift apart. Run after changing the API: python3 scripts/gen-openapi.py
"""
import json, os

def ref(n): return {"$ref": f"#/components/schemas/{n}"}
def arr(s): return {"type": "array", "items": s}
S = lambda **kw: {"type": "string", **kw}
I = lambda **kw: {"type": "integer", "format": "int64", "minimum": 0, **kw}
B = {"type": "boolean"}
NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", "maxLength": 63}

def obj(props, required=(), extra=True):
    o = {"type": "object", "properties": props}
    if required: o["required"] = list(required)
    if not extra: o["additionalProperties"] = False
    return o

schemas = {
    "Error": obj({"code": S(), "message": S()}, ["code", "message"]),
    "Meta": obj({"name": S(), "uid": S(), "resourceVersion": I(), "generation": I(),
                 "labels": {"type": "object", "additionalProperties": S()}, "created": I(),
                 "deletionRequested": I()}, ["name"]),
    "Volume": obj({"metadata": ref("Meta"),
        "spec": obj({"size": I(), "replicas": I(), "standby": B, "backupTarget": S(), "node": S(), "fromBackup": S(), "backupVolume": S(), "activate": B, "revert": S(), "backingImage": NAME}, ["size", "replicas"]),
        "status": obj({"state": S(enum=["creating", "detached", "attaching", "attached", "detaching", "deleting"]),
                       "robustness": S(enum=["healthy", "degraded", "faulted", "unknown"]),
                       "nbdUri": S(), "node": S(), "lastBackup": S(), "lastBackupAt": I(), "message": S(),
                       "restore": obj({"requestedBackup": S(), "lastRestoredBackup": S(), "progress": I(maximum=100),
                                       "state": S(), "error": S(), "lastRestoredMs": I(), "activationError": S(),
                                       "snapshots": arr(ref("SnapshotInfo"))}),
                       "revert": obj({"snapshot": S(), "state": S(enum=["pending", "done", "error"]), "error": S()}, ["snapshot", "state"])})},
        ["metadata", "spec", "status"]),
    "Replica": obj({"metadata": ref("Meta"),
        "spec": obj({"volume": S(), "node": S(), "disk": S(), "size": I(), "backingImage": S()}),
        "status": obj({"mode": S(enum=["RW", "WO", "ERR"]), "state": S(), "address": S(), "failedAt": I(),
                       "flushSeq": I(), "rebuildCopied": I(), "rebuildSkipped": I(), "rebuildTotal": I(), "message": S()})}, ["metadata", "spec", "status"]),
    "EngineReplica": obj({"name": S(), "address": S(), "candidate": B}, ["name", "address"]),
    "TargetRef": obj({"name": S(), "url": S(), "options": {"type": "object", "additionalProperties": S()}}, ["name", "url"]),
    "EngineSpec": obj({"volume": S(), "node": S(), "size": I(), "generation": I(), "replicas": arr(ref("EngineReplica")),
                       "frontend": B, "restore": obj({"backup": S(), "from": S(), "sourceVolume": S(), "target": ref("TargetRef")}),
                       "replicaTimeout": I()},
                      ["volume", "node", "size", "generation", "replicas"]),
    "Engine": obj({"metadata": ref("Meta"), "spec": ref("EngineSpec"),
                   "status": obj({"state": S(), "nbdUri": S(), "message": S(), "rwReplicas": I()})}, ["metadata", "spec"]),
    "Disk": obj({"path": S(), "capacity": I(), "available": I(), "scheduled": I()}, ["path", "capacity", "available"]),
    "Salvage": obj({"replica": NAME}, ["replica"], extra=False),
    "NodeUpdate": obj({"allowScheduling": B, "evict": B}, extra=False),
    "Node": obj({"metadata": ref("Meta"), "spec": obj({"allowScheduling": B, "evict": B}),
                 "status": obj({"state": S(enum=["up", "down", ""]), "address": S(), "nbdAddress": S(), "transferAddress": S(),
                                "lastHeartbeat": I(), "disks": arr(ref("Disk"))})}, ["metadata"]),
    "Snapshot": obj({"metadata": ref("Meta"), "spec": obj({"volume": S(), "name": S()}, ["volume", "name"]),
                     "status": obj({"ready": B, "created": I(), "parent": S(), "userCreated": B, "size": I()})},
                    ["metadata", "spec"]),
    "SnapshotInfo": obj({"name": S(), "created": I(), "parent": S(), "userCreated": B, "size": I()},
                        ["name", "created", "parent", "userCreated", "size"]),
    "CreateSnapshot": obj({"name": NAME}, extra=False),
    "Setting": obj({"metadata": ref("Meta"), "value": S()}, ["metadata", "value"]),
    "CreateVolume": obj({"name": NAME, "size": I(), "replicas": I(minimum=1, maximum=16), "fromBackup": NAME, "backupTarget": NAME, "standby": B, "backingImage": NAME}, ["name"], extra=False),
    "BackupTarget": obj({"metadata": ref("Meta"),
        "spec": obj({"url": S(), "pollInterval": I(), "options": {"type": "object", "additionalProperties": S(),
                     "description": "secret values are shown as (hidden)"}}),
        "status": obj({"available": B, "message": S(), "lastSyncedAt": I()})}, ["metadata", "spec"]),
    "TargetRequest": obj({"name": NAME, "url": S(), "pollInterval": I(minimum=1), "options": {"type": "object", "additionalProperties": S()},
                          "clearOptions": B}, extra=False),
    "BackupVolume": obj({"metadata": ref("Meta"), "spec": obj({"target": S(), "volume": S()}),
        "status": obj({"lastBackup": S(), "lastBackupAt": I(), "backups": I(), "size": I()})}, ["metadata", "spec"]),
    "BlockCounts": obj({"total": I(), "uploaded": I(), "present": I(), "zero": I()}, ["total", "uploaded", "present", "zero"]),
    "Backup": obj({"metadata": ref("Meta"), "spec": obj({"volume": S(), "snapshot": S(), "target": S(), "full": B}, ["volume", "target"]),
        "status": obj({"state": S(enum=["New", "InProgress", "Completed", "Error"]), "progress": I(maximum=100), "error": S(),
                       "url": S(), "blocks": ref("BlockCounts"), "bytes": obj({"uploaded": I(), "stored": I()}),
                       "snapshot": S(), "parent": S(), "volumeSize": I(), "blockSize": I(), "createdMs": I(),
                       "completedAt": I(), "node": S(), "failedAt": I(), "manifestTag": S()})}, ["metadata", "spec"]),
    "CreateBackup": obj({"volume": NAME, "snapshot": NAME, "target": NAME, "full": B,
                         "labels": {"type": "object", "additionalProperties": S(pattern="^[A-Za-z0-9._-]{0,63}$")}}, ["volume"], extra=False),
    "Verify": obj({"deep": B}, extra=False),
    "VerifyResult": obj({"backup": S(), "deep": B, "blocks": I(), "ok": B,
                         "problems": arr(obj({"key": S(), "problem": S()}, ["key", "problem"]))},
                        ["backup", "deep", "blocks", "ok", "problems"]),
    "Attach": obj({"node": NAME}, extra=False),
    "Expand": obj({"size": I()}, ["size"], extra=False),
    "SettingValue": obj({"value": S()}, ["value"], extra=False),
    "Heartbeat": obj({"address": S(), "nbdAddress": S(), "disks": arr(ref("Disk")),
        "brokenReplicas": arr(obj({"name": S(), "reason": S()}, ["name", "reason"])),
        "engineErrors": arr(obj({"volume": S(), "generation": I(), "message": S()}, ["volume", "generation", "message"])),
        "replicas": arr(obj({"name": S(), "address": S(), "flushSeq": I()}, ["name", "address", "flushSeq"])),
        "engines": arr(obj({"volume": S(), "generation": I(), "nbdUri": S(),
            "replicas": arr(obj({"name": S(), "mode": S(enum=["RW", "WO", "ERR"]), "rebuildCopied": I(), "rebuildSkipped": I(), "rebuildTotal": I()},
                                ["name", "mode", "rebuildCopied", "rebuildSkipped"])),
            "snapshots": arr(ref("SnapshotInfo")),
            "restore": obj({"backup": S(), "volumeSize": I(), "state": S(), "progress": I(), "error": S()}, ["backup", "state", "progress"])},
            ["volume", "generation", "nbdUri", "replicas"])),
        "backups": arr(obj({"name": S(), "state": S(enum=["New", "InProgress", "Completed", "Error"]), "error": S(),
                            "blocks": ref("BlockCounts"), "bytes": obj({"uploaded": I(), "stored": I()}),
                            "snapshot": S(), "parent": S(), "volumeSize": I(), "blockSize": I(), "createdMs": I()},
                           ["name", "state", "blocks", "bytes"])),
        "transferAddress": S(),
        "backingImages": arr(obj({"name": S(), "uid": S(), "state": S(), "progress": I(), "size": I(), "checksum": S(), "message": S()},
                                 ["name", "uid", "state"]))},
        ["address", "nbdAddress", "disks", "replicas", "engines"]),
    "Assignments": obj({"replicas": arr(obj({"name": S(), "volume": S(), "disk": S(), "size": I(), "backingImage": ref("CopyRef")})),
                        "backingImages": arr(obj({"copy": ref("CopyRef"),
                                                  "source": obj({"kind": S(enum=["url", "peer", "upload", "export", "restore"]), "url": S(), "node": S(), "peer": S(), "copy": ref("CopyRef"),
                                                                "volume": S(), "snapshot": S(), "target": ref("TargetRef"), "owner": S(), "backup": S()}, ["kind"])},
                                                 ["copy", "source"])),
                        "deleteBackingImages": arr(ref("CopyRef")),
                        "engines": arr(ref("EngineSpec")), "deleteReplicas": arr(S()),
                        "snapshots": arr(obj({"volume": S(), "name": S(), "delete": B}, ["volume", "name", "delete"])),
                        "backups": arr(obj({"name": S(), "volume": S(), "snapshot": S(), "state": S(), "target": ref("TargetRef"),
                                            "parents": arr(arr(S())), "blockSize": I(), "codec": S(), "concurrency": I(),
                                            "bandwidth": I()}))}),
    "BackingImageSource": obj({"kind": S(enum=["download", "upload", "clone", "export", "restore"]), "url": S(), "image": S(), "volume": S(), "snapshot": S(), "backup": S()}, ["kind"]),
    "BackupBackingImage": obj({"target": NAME}, extra=False),
    "BackingImage": obj({"metadata": ref("Meta"),
        "spec": obj({"source": ref("BackingImageSource"), "checksum": S(pattern="^[0-9a-f]{128}$"), "minCopies": I(minimum=1)}, ["source"]),
        "status": obj({"state": S(enum=["pending", "in-progress", "ready", "failed"]), "progress": I(maximum=100),
                       "virtualSize": I(), "checksum": S(), "message": S(),
                       "copies": arr(obj({"node": S(), "disk": S(), "state": S(enum=["pending", "in-progress", "ready", "failed"]),
                                          "progress": I(maximum=100), "message": S()}, ["node", "state"]))})},
        ["metadata", "spec"]),
    "CreateBackingImage": obj({"name": NAME, "source": ref("BackingImageSource"), "checksum": S(pattern="^[0-9a-fA-F]{128}$"),
                               "minCopies": I(minimum=1, maximum=64)}, ["name", "source"], extra=False),
    "UpdateBackingImage": obj({"minCopies": I(minimum=1, maximum=64)}, ["minCopies"], extra=False),
    "CopyRef": obj({"name": S(), "uid": S(), "checksum": S(), "size": I()}, ["name", "uid"]),
    "ReplicaEvent": obj({"volume": S(), "replica": S(), "generation": I(), "mode": S(enum=["RW", "WO", "ERR"]), "reason": S()},
                        ["volume", "replica", "generation", "mode"]),
}

def resp(code, schema, desc="OK"):
    r = {"description": desc}
    if schema: r["content"] = {"application/json": {"schema": schema}}
    return {str(code): r}

ERR = {"400": {"description": "bad input", "content": {"application/json": {"schema": ref("Error")}}},
       "401": {"description": "missing or wrong token", "content": {"application/json": {"schema": ref("Error")}}},
       "404": {"description": "not found", "content": {"application/json": {"schema": ref("Error")}}},
       "409": {"description": "conflict with the current state", "content": {"application/json": {"schema": ref("Error")}}}}

def op(summary, ok, body=None, params=(), code=200, auth=True):
    o = {"summary": summary, "responses": {**resp(code, ok), **(ERR if auth else {})}}
    if body: o["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params: o["parameters"] = list(params)
    if not auth: o["security"] = []
    return o

P = lambda n: {"name": n, "in": "path", "required": True, "schema": NAME}
paths = {
    "/v1/health": {"get": op("Liveness; needs no token", obj({"status": S()}), auth=False)},
    "/v1/openapi.json": {"get": op("This document", {"type": "object"})},
    "/v1/volumes": {"get": op("List volumes", arr(ref("Volume"))),
                    "post": op("Create a volume", ref("Volume"), ref("CreateVolume"), code=201)},
    "/v1/volumes/{name}": {"get": op("Get a volume", ref("Volume"), params=[P("name")]),
                           "delete": op("Delete a detached volume and its replicas", ref("Volume"), params=[P("name")], code=202)},
    "/v1/volumes/{name}/attach": {"post": op("Attach to a node (default: the server's own node)", ref("Volume"), ref("Attach"), [P("name")])},
    "/v1/volumes/{name}/detach": {"post": op("Detach", ref("Volume"), params=[P("name")])},
    "/v1/volumes/{name}/salvage": {"post": op("Salvage a faulted volume from the replica given", ref("Volume"), ref("Salvage"), [P("name")])},
    "/v1/volumes/{name}/activate": {"post": op("Make a standby volume a normal one once the newest backup is restored", ref("Volume"), params=[P("name")])},
    "/v1/volumes/{name}/expand": {"post": op("Grow a detached volume", ref("Volume"), ref("Expand"), [P("name")])},
    "/v1/volumes/{name}/snapshots": {"get": op("List an attached volume's snapshots", arr(ref("SnapshotInfo")), params=[P("name")]),
                                      "post": op("Take a snapshot of an attached volume", ref("Snapshot"), ref("CreateSnapshot"), [P("name")], code=201)},
    "/v1/volumes/{name}/snapshots/{snapshot}/revert": {"post": op("Revert a detached volume to a snapshot", ref("Volume"),
        params=[P("name"), {"name": "snapshot", "in": "path", "required": True, "schema": NAME}], code=202)},
    "/v1/volumes/{name}/snapshots/{snapshot}": {"delete": op("Delete a snapshot (merged away in the background)", ref("Snapshot"),
                                                params=[P("name"), P("snapshot")], code=202)},
    "/v1/replicas": {"get": op("List replicas", arr(ref("Replica")),
                               params=[{"name": "volume", "in": "query", "required": False, "schema": NAME}])},
    "/v1/replicas/{name}": {"get": op("Get a replica", ref("Replica"), params=[P("name")]),
                            "delete": op("Delete a replica (refused for the last complete copy unless force=true)", ref("Replica"),
                                         params=[P("name"), {"name": "force", "in": "query", "required": False, "schema": B}], code=202)},
    "/v1/engines": {"get": op("List engines", arr(ref("Engine")))},
    "/v1/nodes": {"get": op("List nodes", arr(ref("Node")))},
    "/v1/nodes/{name}": {"get": op("Get a node", ref("Node"), params=[P("name")]),
                         "put": op("Change whether replicas may be scheduled on a node, or evict it", ref("Node"), ref("NodeUpdate"), [P("name")]),
                         "delete": op("Delete a node that holds no replicas and runs no engines", ref("Node"), params=[P("name")])},
    "/v1/nodes/{name}/evict": {"post": op("Move every replica off a node, one complete copy at a time", ref("Node"), params=[P("name")])},
    "/v1/nodes/{name}/wait": {"get": op("A node's long-poll: answers when the manager has work for it or at the timeout", obj({"woken": B}),
                               params=[P("name"), {"name": "timeoutMs", "in": "query", "required": False, "schema": I(maximum=2000)}])},
    "/v1/nodes/{name}/heartbeat": {"post": op("A node agent's report; answers with its assignments", ref("Assignments"), ref("Heartbeat"), [P("name")])},
    "/v1/replica-events": {"post": op("An engine's replica membership change, recorded before the answer", ref("Replica"), ref("ReplicaEvent"))},
    "/v1/settings": {"get": op("List settings", arr(ref("Setting")))},
    "/v1/settings/{name}": {"put": op("Change a setting", ref("Setting"), ref("SettingValue"), [{"name": "name", "in": "path", "required": True, "schema": S()}])},
    "/v1/backup-targets": {"get": op("List backup targets (secrets hidden)", arr(ref("BackupTarget"))),
                           "post": op("Add a backup target (its marker is written on first use)", ref("BackupTarget"), ref("TargetRequest"), code=201)},
    "/v1/backup-targets/{name}": {"get": op("Get a backup target", ref("BackupTarget"), params=[P("name")]),
                                  "put": op("Change a target's URL, poll interval or options (an empty value removes an option)", ref("BackupTarget"), ref("TargetRequest"), [P("name")]),
                                  "delete": op("Delete a target object; its remote data stays", ref("BackupTarget"), params=[P("name")])},
    "/v1/backup-targets/{name}/sync": {"post": op("Sync the target's backups now", ref("BackupTarget"), params=[P("name")])},
    "/v1/backup-volumes": {"get": op("List backup volumes (the backups of one volume on one target)", arr(ref("BackupVolume")))},
    "/v1/backups": {"get": op("List backups", arr(ref("Backup")),
                              params=[{"name": "volume", "in": "query", "required": False, "schema": NAME},
                                      {"name": "target", "in": "query", "required": False, "schema": NAME},
                                      {"name": "label", "in": "query", "required": False, "schema": S(),
                                       "description": "KEY=VALUE[,KEY=VALUE...]: backups with every one of these labels"}]),
                    "post": op("Back up an attached volume (a snapshot is taken when none is named)", ref("Backup"), ref("CreateBackup"), code=201)},
    "/v1/backups/{name}": {"get": op("Get a backup", ref("Backup"), params=[P("name")]),
                           "delete": op("Delete a backup and the blocks no other backup uses", ref("Backup"), params=[P("name")])},
    "/v1/backups/{name}/verify": {"post": op("Check that every block exists (deep: re-hash each)", ref("VerifyResult"), ref("Verify"), [P("name")])},
    "/v1/backing-images": {"get": op("List backing images", arr(ref("BackingImage"))),
                           "post": op("Create a backing image from a URL, an upload to come, another image or a volume's snapshot", ref("BackingImage"), ref("CreateBackingImage"), code=201)},
    "/v1/backing-images/{name}": {"get": op("Get a backing image", ref("BackingImage"), params=[P("name")]),
                                  "put": op("Change how many nodes keep a copy", ref("BackingImage"), ref("UpdateBackingImage"), [P("name")]),
                                  "delete": op("Delete a backing image no volume uses; nodes delete their copies", ref("BackingImage"), params=[P("name")])},
    "/v1/backing-images/{name}/upload": {"put": {"summary": "Upload an image's bytes (raw or qcow2), streamed to the node of its first copy; answers once the copy is verified",
        "parameters": [P("name")],
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": S(format="binary")}}},
        "responses": {**resp(200, ref("BackingImage")), **ERR}}},
    "/v1/backing-images/{name}/backup": {"post": op("Back up the image to a target (default: default); listed among backups as volume bi.NAME", ref("Backup"), ref("BackupBackingImage"), [P("name")], code=201)},
    "/v1/backing-images/{name}/download": {"get": {"summary": "The image's raw bytes from a node with a ready copy (header X-Zebu-Checksum: its SHA-512)",
        "parameters": [P("name")],
        "responses": {"200": {"description": "raw bytes", "content": {"application/octet-stream": {"schema": S(format="binary")}}}, **ERR}}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format",
                         "content": {"text/plain": {"schema": S()}}}, "401": ERR["401"]}}},
}

doc = {"openapi": "3.0.3",
       "info": {"title": "Zebu API", "version": "1", "description": "Zebu's control plane. Every call but GET /v1/health needs `Authorization: Bearer TOKEN` (DATA_DIR/api-token)."},
       "servers": [{"url": "http://127.0.0.1:9500"}],
       "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
       "security": [{"bearer": []}],
       "paths": paths}
out = os.path.join(os.path.dirname(__file__), "..", "docs", "openapi.json")
with open(out, "w") as f:
    json.dump(doc, f, indent=2, sort_keys=True)
    f.write("\n")
