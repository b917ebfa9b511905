"""The importer's GGUF reader parses exactly what gguf's own reader does, only faster."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter

from semantic_server.models.gguf_reader import FastGGUFReader


def _write(path, endian: GGUFEndian) -> None:
    writer = GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_string("general.name", "tiny")
    writer.add_uint32("llama.block_count", 2)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "", "héllo", "▁world", "\n" * 3])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0, -0.125])
    writer.add_array("tokenizer.ggml.token_type", [1, 2, 3, 1, 6])
    writer.add_array("tokenizer.ggml.merges", [])
    writer.add_key_value("nested", [[1, 2], [3]], GGUFValueType.ARRAY)
    for name, sub_type, values in (("bools", GGUFValueType.BOOL, [True, False, True]),
                                   ("u64", GGUFValueType.UINT64, [0, 2**63 + 5]),
                                   ("f64", GGUFValueType.FLOAT64, [0.5, -1e300]),
                                   ("i8", GGUFValueType.INT8, [-128, 127, 0])):
        writer.add_key_value(name, values, GGUFValueType.ARRAY, sub_type=sub_type)
    writer.add_tensor("blk.0.attn_q.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_empty_arrays(path) -> None:
    """What gguf's writer refuses to write: empty arrays (one of an element type that does
    not exist, which the stock reader never looks at), and a nested array whose first
    element is empty. Little-endian GGUF v3, by hand."""
    def kv(key: str, payload: bytes) -> bytes:
        return (struct.pack("<Q", len(key)) + key.encode() +
                struct.pack("<I", GGUFValueType.ARRAY) + payload)

    array, i32 = GGUFValueType.ARRAY, GGUFValueType.INT32
    kvs = [kv("empty", struct.pack("<IQ", i32, 0)),
           kv("empty.odd_type", struct.pack("<IQ", 99, 0)),
           kv("nested.empty_first", struct.pack("<IQ", array, 2) + struct.pack("<IQ", i32, 0)
              + struct.pack("<IQii", i32, 2, 1, 2))]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))


def _assert_same_fields(fast: GGUFReader, stock: GGUFReader) -> None:
    assert list(fast.fields) == list(stock.fields)
    for name, expected in stock.fields.items():
        got = fast.fields[name]
        assert (got.offset, got.types, got.data) == (expected.offset, expected.types,
                                                     expected.data), name
        assert [(p.dtype, p.tobytes()) for p in got.parts] == [
            (p.dtype, p.tobytes()) for p in expected.parts], name
        assert got.contents() == expected.contents(), name


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_fields_and_tensors_equal_the_stock_readers(tmp_path, endian):
    path = tmp_path / "tiny.gguf"
    _write(path, endian)
    fast, stock = FastGGUFReader(path), GGUFReader(path)
    assert fast.byte_order == ("S" if endian == GGUFEndian.BIG else "I")  # swapped on read
    _assert_same_fields(fast, stock)
    assert fast.fields["tokenizer.ggml.tokens"].contents()[2] == "héllo"
    assert fast.fields["u64"].contents() == [0, 2**63 + 5]
    assert fast.fields["tokenizer.ggml.scores"].contents() == [0.0, -1.5, 2.25, 3.0, -0.125]
    (tensor,) = fast.tensors
    assert np.array_equal(tensor.data, stock.tensors[0].data)


def test_empty_arrays_parse_as_the_stock_reader_parses_them(tmp_path):
    path = tmp_path / "empty.gguf"
    _write_empty_arrays(path)
    fast, stock = FastGGUFReader(path), GGUFReader(path)
    _assert_same_fields(fast, stock)
    assert fast.fields["empty"].contents() == []
    assert fast.fields["nested.empty_first"].contents() == [1, 2]  # gguf flattens nesting
