"""Wire format: descriptors and manifests validate, round-trip, and reject bad input."""

from __future__ import annotations

import pickle

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mx_reference.refit.wire import (
    SCHEMA_VERSION,
    ShardDescriptor,
    decode_manifest,
    encode_manifest,
    layout_signature,
    make_manifest,
    name_digest,
)


def desc(**kw) -> ShardDescriptor:
    fields = {"name": "w", "global_shape": (8, 4), "dtype": "float32", "nbytes": 128} | kw
    return ShardDescriptor(**fields)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"style": "diagonal"}, "style"),
        ({"placement": "sideways"}, "placement"),
        ({"dtype": "float13"}, "dtype"),
        (
            {"style": "column", "placement": "shard", "shard_range": (4, 10), "nbytes": 96},
            "shard_range",
        ),
        ({"style": "column", "placement": "shard", "shard_range": (2, 2)}, "shard_range"),
        ({"nbytes": 0}, "nbytes"),
        ({"name": "__mx_v2_meta__"}, "name"),
        ({"shard_axis": 2}, "shard_axis"),
        ({"style": "qkv_column", "num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"style": "expert_row", "expert_ids": (), "num_experts": 4}, "expert_ids"),
        ({"expert_ids": (1,), "num_experts": 4}, "expert_ids"),
    ],
)
def test_bad_descriptor_raises_naming_tensor_and_field(kw, field):
    with pytest.raises(ValueError, match=f"tensor '(w|__mx_v2_meta__)'.*field '{field}'"):
        desc(**kw)


def test_gated_range_is_along_each_half():
    d = desc(style="gated_mlp_column", placement="shard", shard_range=(1, 3), nbytes=4 * 4 * 4)
    assert d.local_shape == (4, 4) and d.segments() == [(1, 3), (5, 7)]


@given(
    rows=st.integers(1, 64),
    cols=st.integers(1, 8),
    cut=st.integers(0, 63),
    version=st.integers(0, 2**40),
    agent=st.binary(max_size=64),
)
def test_manifest_round_trip(rows, cols, cut, version, agent):
    lo = min(cut, rows - 1)
    d = desc(
        global_shape=(rows, cols),
        style="column",
        placement="shard",
        shard_range=(lo, rows),
        nbytes=(rows - lo) * cols * 4,
        offset=256,
    )
    m = make_manifest(
        "m",
        version,
        [d, desc(name="n", global_shape=(3,), nbytes=12)],
        tp=(1, 2),
        agent_metadata=agent,
    )
    assert decode_manifest(encode_manifest(m)) == m


def test_signature_is_version_independent_and_topology_sensitive():
    tensors = [desc()]
    a = make_manifest("m", 1, tensors, tp=(0, 2))
    b = make_manifest("m", 2, tensors, tp=(0, 2), revision="abc")
    assert a.layout_signature == b.layout_signature
    assert a.layout_signature != make_manifest("m", 1, tensors, tp=(1, 2)).layout_signature
    assert a.layout_signature != layout_signature([desc(dtype="bfloat16", nbytes=64)], tp=(0, 2))
    assert name_digest(["a", "b"]) != name_digest(["b", "a"])


def test_tampered_or_foreign_bytes_are_rejected():
    m = make_manifest("m", 1, [desc()])
    raw = msgspec.msgpack.decode(encode_manifest(m))
    with pytest.raises(ValueError, match="field 'layout_signature'"):
        decode_manifest(msgspec.msgpack.encode(raw | {"tp_rank": 0, "tp_size": 2}))
    raw["tensors"][0]["nbytes"] = 7
    with pytest.raises(ValueError, match="tensor 'w'.*field 'nbytes'"):
        decode_manifest(msgspec.msgpack.encode(raw))
    with pytest.raises(ValueError, match="bad refit manifest"):
        decode_manifest(pickle.dumps(m))  # never unpickled


def test_newer_schema_refused_and_unknown_fields_ignored():
    raw = msgspec.msgpack.decode(encode_manifest(make_manifest("m", 1, [desc()])))
    assert decode_manifest(msgspec.msgpack.encode(raw | {"future_field": 1})).version == 1
    with pytest.raises(ValueError, match="field 'schema_version'"):
        decode_manifest(msgspec.msgpack.encode(raw | {"schema_version": SCHEMA_VERSION + 1}))


def test_manifest_cross_field_checks():
    with pytest.raises(ValueError, match="field 'tp_rank'"):
        make_manifest("m", 1, [desc()], tp=(2, 2))
    with pytest.raises(ValueError, match="field 'tensors'"):
        make_manifest("m", 1, [desc(), desc()])
    with pytest.raises(ValueError, match="field 'source_kind'"):
        make_manifest("m", 1, [desc()], source_kind="observer")
