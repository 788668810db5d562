"""Files on the storage path through pyarrow.fs, on a local folder and on a real S3-compatible server
(moto's, on 127.0.0.1); and the check that an object-store storage path is usable before a run."""

from __future__ import annotations

import secrets

import pytest

from semckd_ray import nodes, storage
from semckd_ray.config import parse_train_config
from semckd_ray.errors import UserError

TWO_HOSTS = [
    {"NodeID": "a" * 56, "Alive": True, "NodeManagerHostname": "gpu-1", "NodeManagerAddress": "10.0.0.1",
     "Resources": {"CPU": 1.0}},
    {"NodeID": "b" * 56, "Alive": True, "NodeManagerHostname": "gpu-2", "NodeManagerAddress": "10.0.0.2",
     "Resources": {"CPU": 1.0}},
]


def config(storage_path: str):
    return parse_train_config({"student": {"model": "resnet8"}, "method": {"name": "vanilla"},
                               "tracking": {"storage_path": storage_path}})


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A storage path: a local folder, or a prefix in a new bucket of the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return storage.join(request.getfixturevalue("s3_bucket"), "store")


def test_join_keeps_the_query_and_stays_below_the_location():
    uri = "s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000"
    assert storage.join(uri, "a", "b.json") == "s3://bucket/prefix/a/b.json?endpoint_override=http://127.0.0.1:9000"
    assert storage.join("s3://bucket/", "/a/") == "s3://bucket/a"
    assert storage.join("gs://bucket/x", "y") == "gs://bucket/x/y"
    assert storage.join("/srv/runs", "/a", "b") == "/srv/runs/a/b"
    assert storage.join("file:///srv/runs", "a") == "/srv/runs/a"
    assert storage.is_uri(uri) and not storage.is_uri("file:///srv") and not storage.is_uri("/srv")


def test_files_are_written_read_listed_and_deleted(root):
    assert not storage.exists(root) and storage.list_dir(root) == []
    assert storage.read_text(storage.join(root, "none.json")) is None
    storage.write_text(storage.join(root, "a", "marker.json"), '{"x": 1}')
    storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "a", "marker.json"), '{"x": 2}')  # replaced whole
    assert storage.read_text(storage.join(root, "a", "marker.json")) == '{"x": 2}'
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, "a")) is None  # a folder is no file
    assert storage.list_dir(root) == ["a", "b.bin"] and storage.list_dir(storage.join(root, "a")) == ["marker.json"]
    assert storage.exists(storage.join(root, "a")) and storage.exists(storage.join(root, "b.bin"))
    storage.delete(storage.join(root, "a"))
    storage.delete(storage.join(root, "b.bin"))
    storage.delete(storage.join(root, "gone"))  # nothing there: nothing happens
    assert storage.list_dir(root) == []


def test_a_folder_is_uploaded_and_downloaded(root, tmp_path):
    local = tmp_path / "up"
    (local / "sub").mkdir(parents=True)
    (local / "one.txt").write_text("1")
    (local / "sub" / "two.txt").write_text("2")
    storage.upload(local, storage.join(root, "copy"))
    assert storage.list_dir(storage.join(root, "copy")) == ["one.txt", "sub"]
    storage.download(storage.join(root, "copy"), tmp_path / "down")
    assert (tmp_path / "down" / "sub" / "two.txt").read_text() == "2"
    storage.upload(local / "one.txt", storage.join(root, "single", "one.txt"))
    assert storage.read_text(storage.join(root, "single", "one.txt")) == "1"


def test_a_local_write_leaves_no_temporary_file(tmp_path):
    storage.write_text(str(tmp_path / "x" / "m.json"), "a")
    storage.write_text(f"file://{tmp_path}/x/m.json", "b")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["m.json"] and (tmp_path / "x" / "m.json").read_text() == "b"


def test_redact_hides_the_credentials_of_an_object_store_uri():
    uri = "s3://AKIDEXAMPLE:hunter2hunter2@b/p?endpoint_override=http://127.0.0.1:9000"
    assert storage.redact(f"cannot reach {uri}") == "cannot reach s3://b/p?endpoint_override=http://127.0.0.1:9000"


# ------------------------------------------------------------------------------------------
# nodes.storage_path: an object-store storage path is checked before any run


def test_an_object_store_storage_path_is_written_read_back_and_left_clean(s3_bucket, monkeypatch):
    monkeypatch.setattr(nodes, "probe_nodes", lambda *a, **k: pytest.fail("probed: one node reads nothing"))
    uri = storage.join(s3_bucket, "runs")
    assert nodes.storage_path(config(uri), TWO_HOSTS[:1]) == uri
    assert storage.list_dir(uri) == []  # the marker is removed


def test_every_node_reads_the_object_store_marker_and_a_blind_one_is_named(s3_bucket, monkeypatch):
    seen = []

    def probe(targets, fn, marker, token):
        seen.append((fn, storage.read_text(marker) == token, len(targets)))
        return {TWO_HOSTS[0]["NodeID"]: None, TWO_HOSTS[1]["NodeID"]: f"cannot read {marker} (OSError: denied)"}

    monkeypatch.setattr(nodes, "probe_nodes", probe)
    uri = storage.join(s3_bucket, "runs")
    with pytest.raises(UserError) as info:
        nodes.storage_path(config(uri), TWO_HOSTS)
    message = str(info.value)
    assert seen == [(nodes.read_marker, True, 2)]
    assert f"tracking.storage_path {uri}:" in message and "1 of the 2 nodes" in message
    assert "gpu-2 (10.0.0.2, node bbbbbbbb)" in message and "gpu-1" not in message
    assert storage.list_dir(uri) == []
    with pytest.raises(UserError, match="no s3://"):
        nodes.read_marker(storage.join(s3_bucket, "nothing"), "x")


def test_an_unusable_object_store_is_refused_naming_the_uri_and_the_error_without_credentials(s3_server):
    bucket = f"no-such-{secrets.token_hex(4)}"
    missing = f"s3://AKIDEXAMPLE:hunter2hunter2@{bucket}/runs?endpoint_override={s3_server}"
    with pytest.raises(UserError) as info:
        nodes.storage_path(config(missing), TWO_HOSTS[:1])
    message = str(info.value)
    assert message.startswith(f"tracking.storage_path s3://{bucket}/runs?endpoint_override={s3_server}: ")
    assert "cannot write" in message and "NO_SUCH_BUCKET" in message, message
    assert "hunter2" not in message and "AKIDEXAMPLE" not in message
    with pytest.raises(UserError, match=r"tracking.storage_path s3://bucket/runs\?bogus=1: .*ArrowInvalid"):
        nodes.storage_path(config("s3://bucket/runs?bogus=1"), TWO_HOSTS[:1])
