"""The importer's GGUF reader parses exactly what gguf's own reader does, only faster."""

from __future__ import annotations

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
    writer.add_tensor("blk.0.attn_q.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_fields_and_tensors_equal_the_stock_readers(tmp_path, endian):
    path = tmp_path / "tiny.gguf"
    _write(path, endian)
    fast, stock = FastGGUFReader(path), GGUFReader(path)
    assert fast.byte_order == ("S" if endian == GGUFEndian.BIG else "I")  # swapped on read
    assert list(fast.fields) == list(stock.fields)
    for name, expected in stock.fields.items():
        got = fast.fields[name]
        assert (got.offset, got.types, got.data) == (expected.offset, expected.types,
                                                     expected.data), name
        assert [(p.dtype, p.tobytes()) for p in got.parts] == [
            (p.dtype, p.tobytes()) for p in expected.parts], name
        assert got.contents() == expected.contents(), name
    assert fast.fields["tokenizer.ggml.tokens"].contents()[2] == "héllo"
    assert fast.fields["tokenizer.ggml.scores"].contents() == [0.0, -1.5, 2.25, 3.0, -0.125]
    (tensor,) = fast.tensors
    assert np.array_equal(tensor.data, stock.tensors[0].data)
