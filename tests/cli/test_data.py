"""JSONL loading, prompt formatting, loss masks, padding and the batch order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from losia_cli import data as D
from tests.cli.tiny_model import make_tokenizer


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer()


def write(tmp_path, text, name="d.jsonl"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_load_jsonl(tmp_path):
  path = write(tmp_path, '{"prompt": "a", "response": "b", "extra": 1}\n\n'
               '{"prompt": "", "response": "c"}\n')
  assert D.load_jsonl(path) == [D.Example("a", "b"), D.Example("", "c")]


@pytest.mark.parametrize("text,line,words", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', 2, ["invalid JSON"]),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', 3, ['missing key "response"']),
    ('{"response": "b"}\n', 1, ['missing key "prompt"']),
    ('{"prompt": "a", "response": 7}\n', 1, ['"response" must be a string', "int"]),
    ('{"prompt": ["a"], "response": "b"}\n', 1, ['"prompt" must be a string', "list"]),
    ('["a", "b"]\n', 1, ["JSON object"]),
    ('{"prompt": "a", "response": "  "}\n', 1, ['"response" is empty']),
])
def test_load_jsonl_errors_name_the_line(tmp_path, text, line, words):
  path = write(tmp_path, text)
  with pytest.raises(D.DataError) as e:
    D.load_jsonl(path)
  assert f"{path}:{line}:" in str(e.value)
  for w in words:
    assert w in str(e.value)


def test_load_jsonl_empty_and_unreadable(tmp_path):
  for text in ("", "\n  \n"):
    path = write(tmp_path, text)
    with pytest.raises(D.DataError, match="no examples"):
      D.load_jsonl(path)
  bad = tmp_path / "bin.jsonl"
  bad.write_bytes(b"\xff\xfe\x00")
  with pytest.raises(D.DataError, match="UTF-8"):
    D.load_jsonl(str(bad))
  with pytest.raises(D.DataError, match="cannot read"):
    D.load_jsonl(str(tmp_path / "missing.jsonl"))


def test_plain_formatting(tok):
  f = D.Formatter(tok)
  assert not f.chat
  e = f.encode(D.Example("What is 2 plus 3?", "5"))
  assert tok.decode(list(e.prompt_ids)) == "What is 2 plus 3?\n"
  assert e.target_ids == (tok.convert_tokens_to_ids("5"), tok.eos_token_id)
  assert f.decode(e.target_ids) == "5"


def test_chat_template_formatting(tok):
  import copy
  chat = copy.deepcopy(tok)
  chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
  f = D.Formatter(chat)
  assert f.chat
  e = f.encode(D.Example("hi?", "42"))
  assert chat.decode(list(e.prompt_ids)) == "<user>hi?<assistant>"
  assert e.target_ids == tuple(chat.convert_tokens_to_ids(["4", "2"])) + (chat.eos_token_id,)


def test_no_eos_means_no_eos_appended(tok):
  import copy
  t = copy.deepcopy(tok)
  t.eos_token = None
  f = D.Formatter(t)
  assert f.eos_id is None
  assert f.target_ids("12") == tuple(t.convert_tokens_to_ids(["1", "2"]))
  assert f.pad_id == t.pad_token_id


def test_masks_cover_exactly_the_response(tok):
  f = D.Formatter(tok)
  examples = [D.Example("What is 12 plus 7?", "19"), D.Example("Hi", "hello there"),
              D.Example("", "x")]
  _, enc, dropped = D.encode_all(examples, f, seq_len=32)
  assert dropped == 0
  b = D.make_batch(enc, 32, f.pad_id)
  width = b.input_ids.shape[1]  # the longest (22 tokens) rounded up to a multiple of 8
  assert max(len(e) for e in enc) == 22 and width == 24
  assert b.input_ids.shape == b.attention_mask.shape == b.loss_mask.shape == (3, width)
  assert b.input_ids.dtype == np.int32 and b.attention_mask.dtype == np.int32
  assert b.loss_mask.dtype == np.float32
  for row, e in enumerate(enc):
    n = len(e)
    assert b.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
    assert (b.input_ids[row, n:] == f.pad_id).all()
    # mask[t] = 1 iff ids[t + 1] is a target token: the masked "next tokens" are the target
    t = np.nonzero(b.loss_mask[row])[0]
    assert tuple(b.input_ids[row, t + 1].tolist()) == e.target_ids
    assert b.loss_mask[row].sum() == len(e.target_ids)


def test_too_long_examples_are_dropped(tok):
  f = D.Formatter(tok)
  examples = [D.Example("ab", "c"), D.Example("a" * 30, "b" * 30), D.Example("d", "e")]
  kept, enc, dropped = D.encode_all(examples, f, seq_len=6)
  assert dropped == 1 and kept == [examples[0], examples[2]]
  # exactly seq_len tokens fit: "ab\n" + "c" + eos = 5
  kept, _, dropped = D.encode_all([D.Example("abcd", "c")], f, seq_len=7)
  assert dropped == 0 and len(kept) == 1
  with pytest.raises(ValueError):
    D.make_batch([f.encode(examples[1])], 6, f.pad_id)


def test_batch_order_is_a_pure_function_of_seed_and_step():
  a = D.BatchOrder(10, 4, seed=3)
  later_first = [D.BatchOrder(10, 4, seed=3).indices(k) for k in (7, 2, 0)]
  assert later_first == [a.indices(7), a.indices(2), a.indices(0)]
  assert a.indices(0) != D.BatchOrder(10, 4, seed=4).indices(0)
  # the stream covers each epoch exactly once, in a fresh order per epoch
  stream = sum((a.indices(k) for k in range(5)), [])
  assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
  assert stream[:10] != stream[10:20]
  assert a.epoch_of(4) == 2.0


def test_steps_for_epochs():
  assert D.steps_for_epochs(1, 10, 4) == 3
  assert D.steps_for_epochs(2, 10, 4) == 5
  assert D.steps_for_epochs(0.01, 10, 4) == 1
  assert D.steps_for_epochs(3, 8, 4) == 6


def test_heldout_split():
  ex = [D.Example(f"p{i}", f"r{i}") for i in range(50)]
  train, evals = D.heldout_split(ex, eval_size=64, seed=0)
  assert len(evals) == 5 and len(train) == 45
  assert not set(train) & set(evals) and set(train) | set(evals) == set(ex)
  assert D.heldout_split(ex, 64, 0) == (train, evals)
  assert D.heldout_split(ex, 64, 1) != (train, evals)
  assert len(D.heldout_split(ex, 2, 0)[1]) == 2           # capped by --eval-size
  assert D.heldout_split(ex, 0, 0) == (ex, [])            # no evaluation
  assert [len(x) for x in D.heldout_split(ex[:3], 64, 0)] == [2, 1]  # at least one each
  assert D.heldout_split(ex[:1], 64, 0) == (ex[:1], [])


def test_file_fingerprint(tmp_path):
  path = write(tmp_path, '{"prompt": "a", "response": "b"}\n')
  fp = D.file_fingerprint(path)
  assert fp["bytes"] == 33 and len(fp["sha256"]) == 64
  write(tmp_path, '{"prompt": "a", "response": "c"}\n')
  assert D.file_fingerprint(path)["sha256"] != fp["sha256"]
  assert json.dumps(fp)


def test_batches_pad_to_their_longest_rounded_up_to_8(tok):
  f = D.Formatter(tok)

  def enc(n_prompt, n_response):
    return f.encode(D.Example("p" * n_prompt, "r" * n_response))

  short = [enc(2, 3), enc(1, 1)]            # 3 + 3 + 1 and 2 + 1 + 1 tokens: longest 7
  assert D.make_batch(short, 64, f.pad_id).input_ids.shape == (2, 8)
  exact = [enc(5, 2)]                         # 6 + 2 + 1 = 9 → 16
  assert D.make_batch(exact, 64, f.pad_id).input_ids.shape == (1, 16)
  assert D.make_batch([enc(13, 1)], 64, f.pad_id).input_ids.shape == (1, 16)  # exactly 16
  # never wider than --seq-len, even when seq_len is not a multiple of 8
  assert D.make_batch([enc(10, 5)], 18, f.pad_id).input_ids.shape == (1, 18)
  assert D.make_batch([enc(10, 5)], 18, f.pad_id, multiple=1).input_ids.shape == (1, 17)
  assert D.padded_width(62, 64) == 64 and D.padded_width(41, 64) == 48
  assert D.padded_width(1, 64) == 8 and D.padded_width(5, 6) == 6


def test_micro_batches_split_rows_and_trim_their_own_padding(tok):
  f = D.Formatter(tok)
  enc = [f.encode(D.Example("p" * n, "r")) for n in (20, 3, 2, 1)]  # lengths 23, 6, 5, 4
  batch = D.make_batch(enc, 64, f.pad_id)
  assert batch.input_ids.shape == (4, 24)
  first, second = D.micro_batches(batch, 2)
  assert first.input_ids.shape == (2, 24) and second.input_ids.shape == (2, 8)
  np.testing.assert_array_equal(second.input_ids, batch.input_ids[2:, :8])
  np.testing.assert_array_equal(second.loss_mask, batch.loss_mask[2:, :8])
  assert D.loss_tokens(first) + D.loss_tokens(second) == D.loss_tokens(batch) == 4 * 2
  untrimmed = D.micro_batches(batch, 4, trim=False)
  assert [p.input_ids.shape for p in untrimmed] == [(1, 24)] * 4
  with pytest.raises(ValueError, match="4 sequences cannot be split into 3"):
    D.micro_batches(batch, 3)


def test_trimming_keeps_the_column_a_loss_position_predicts():
  # A hand-made batch whose loss mask reaches the last real token's predecessor.
  ids = np.zeros((1, 16), np.int32)
  attn = np.zeros((1, 16), np.int32)
  mask = np.zeros((1, 16), np.float32)
  attn[0, :9] = 1
  mask[0, 8] = 1.0  # predicts ids[9], which the attention mask calls padding
  (part,) = D.micro_batches(D.Batch(ids, attn, mask), 1, multiple=1)
  assert part.input_ids.shape == (1, 10)
