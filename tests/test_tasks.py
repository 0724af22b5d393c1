"""Tasks: answer extraction, metrics, local loading, formatting, length filter, arithmetic generator."""

from __future__ import annotations

import json
import re

import pytest

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.models.tiny import build_char_tokenizer
from distillspec.tasks.arithmetic import ArithmeticTask
from distillspec.tasks.base import Example, read_records
from distillspec.tasks.gsm8k import GSM8KTask
from distillspec.tasks.metrics import accuracy, extract_answer, rouge
from distillspec.tasks.specbench import SpecBenchTask
from distillspec.tasks.summarization import CNNDMTask, DialogSumTask


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    t = build_char_tokenizer()
    t.chat_template = None
    return t


# --- answer extraction and metrics ---------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("so the total is 3 + 4.\n#### 1,234", 1234.0),
    ("The answer is \\boxed{42}.", 42.0),
    ("She pays #### $5.00", 5.0),
    ("#### -7", -7.0),
    ("it costs $-3.5 in the end\n#### -3.5.", -3.5),
    ("#### 18.", 18.0),
    ("first #### 3 then corrected #### 4", 4.0),          # the last marker wins
    ("\\boxed{9} but actually #### 10", 10.0),
    ("16-3-4 = 9 eggs, 9 * 2 = 18 dollars", 18.0),         # no marker: last number
    ("He has 2,500 coins", 2500.0),
    ("no numbers here at all", None),
    ("#### seven", None),                                  # garbage marker and no other number
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_accuracy_numeric_compare():
    preds = ["#### 5", "\\boxed{1,000}", "so $3.50.", "#### 7", "nothing"]
    refs = ["5.00", "1000", "3.5", "8", "1"]
    assert accuracy(preds, refs) == pytest.approx(3 / 5)
    with pytest.raises(ConfigError, match="2 predictions but 1 references"):
        accuracy(["1", "2"], ["1"])


def test_rouge_known_strings():
    same = rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert set(same) == {C.ROUGE1, C.ROUGE2, C.ROUGEL}
    assert all(v == pytest.approx(1.0) for v in same.values())
    assert all(v == 0.0 for v in rouge(["dogs bark loudly"], ["the cat sat"]).values())
    # "cats sitting" stems to "cat sit": unigram P = R = 2/3, bigram "cat sit" shared only -> 1/2.
    half = rouge(["the cats sitting"], ["a cat sits"])
    assert half[C.ROUGE1] == pytest.approx(2 / 3)
    assert half[C.ROUGE2] == pytest.approx(1 / 2)
    mean = rouge(["a b c", "x y z"], ["a b c", "p q r"])
    assert mean[C.ROUGE1] == pytest.approx(0.5)


# --- construction errors -----------------------------------------------------------
def test_bad_arguments():
    with pytest.raises(ConfigError, match="task.source.*'ftp'.*hf, local"):
        GSM8KTask(source="ftp")
    with pytest.raises(ConfigError, match="source=local needs task.path"):
        GSM8KTask(source="local")
    with pytest.raises(ConfigError, match="task.max_new_tokens=0"):
        ArithmeticTask(max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"\{input\}"):
        ArithmeticTask(instruction="no placeholder")
    with pytest.raises(ConfigError, match="split.*'test'.*train, eval"):
        ArithmeticTask(num_train=2, num_eval=2).load("test")


def test_missing_local_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    task = GSM8KTask(source="local", path=str(missing))
    with pytest.raises(ConfigError, match="data file not found.*nope.jsonl"):
        task.load("eval")
    with pytest.raises(ConfigError, match="needs task.train_path"):
        task.load("train")


def test_read_records_formats(tmp_path):
    rows = [{"question": "q1", "answer": "a #### 1"}, {"question": "q2", "answer": "b #### 2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "c.jsonl").write_text("\n".join(repr(r) for r in rows))  # Python literals (DialogSum)
    for name in ("a.json", "b.jsonl", "c.jsonl"):
        assert read_records(tmp_path / name) == rows
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2"):
        read_records(tmp_path / "bad.jsonl")
    task = GSM8KTask(source="local", path=str(tmp_path / "a.json"), input_field="prompt")
    with pytest.raises(ConfigError, match=r"none of the fields \['prompt'\].*'answer', 'question'"):
        task.load("eval")


# --- formatting, encoding, length filter --------------------------------------------------------
def test_format_chat_and_plain(tok, plain_tok):
    ex = Example(uid="u", prompt="What is 2+2?")
    task = GSM8KTask(source="hf", system_prompt="Be brief.")
    chat = task.format_prompt(ex, tok)
    assert chat.startswith("system: Be brief.\nuser: What is 2+2?")
    assert chat.endswith("'#### <number>'.\nassistant: ")
    plain = task.format_prompt(ex, plain_tok)
    assert plain.startswith("Be brief.\n\nWhat is 2+2?") and plain.endswith("\nAnswer:")
    assert GSM8KTask(source="hf", chat_template="off").format_prompt(ex, tok) == \
        GSM8KTask(source="hf").format_prompt(ex, plain_tok)
    with pytest.raises(ConfigError, match="chat_template='on'"):
        GSM8KTask(source="hf", chat_template="on").format_prompt(ex, plain_tok)


# Qwen3's template, reduced to its generation-prompt branch: enable_thinking=false writes an empty think block
# (the model answers at once); unset, the model is left to open <think> itself.
THINKING_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def thinking_tok(tmp_path_factory):
    """A local tokenizer directory (tokenizer.json + tokenizer_config.json with THINKING_TEMPLATE), loaded back
    the way run.py loads a model's tokenizer."""
    from distillspec.models.loading import load_tokenizer

    t = build_char_tokenizer()
    t.chat_template = THINKING_TEMPLATE
    path = tmp_path_factory.mktemp("thinking_tok")
    t.save_pretrained(path)
    assert "enable_thinking" in (path / "tokenizer_config.json").read_text() + (
        (path / "chat_template.jinja").read_text() if (path / "chat_template.jinja").exists() else "")
    return load_tokenizer(str(path))


def test_chat_template_kwargs_reach_the_template(thinking_tok, caplog):
    ex = Example(uid="u", prompt="What is 2+2?")
    default = GSM8KTask(source="hf").format_prompt(ex, thinking_tok)
    off = GSM8KTask(source="hf", chat_template_kwargs={"enable_thinking": False}).format_prompt(ex, thinking_tok)
    assert default.endswith("<|im_start|>assistant\n") and "<think>" not in default
    assert off == default + "<think>\n\n</think>\n\n"
    on = GSM8KTask(source="hf", chat_template_kwargs={"enable_thinking": True}).format_prompt(ex, thinking_tok)
    assert on == default
    # encode (training, evaluation and the vLLM check all take their prompt ids from it) carries the setting
    task = ArithmeticTask(num_train=4, num_eval=4, chat_template_kwargs={"enable_thinking": False})
    items = task.encode(task.load("eval"), thinking_tok)
    assert all(it.prompt_text.endswith("</think>\n\n") for it in items)
    assert items[0].input_ids == thinking_tok(items[0].prompt_text, add_special_tokens=False)["input_ids"]
    # left unset on a template that reads it: a warning names the setting
    with caplog.at_level("WARNING", logger="distillspec.tasks.base"):
        plain = ArithmeticTask(num_train=4, num_eval=4).encode(task.load("eval"), thinking_tok)
    assert "task.chat_template_kwargs.enable_thinking" in caplog.text
    assert not any("<think>" in it.prompt_text for it in plain)


def test_chat_template_kwargs_from_the_config(thinking_tok):
    """task.chat_template_kwargs as Hydra passes it (a DictConfig from the task yaml) and bad values."""
    from omegaconf import OmegaConf

    node = OmegaConf.create({"_target_": "distillspec.tasks.arithmetic.ArithmeticTask", "num_train": 4,
                             "num_eval": 4, "chat_template_kwargs": {"enable_thinking": False}})
    from hydra.utils import instantiate

    task = instantiate(node)
    assert task.chat_template_kwargs == {"enable_thinking": False}
    assert ArithmeticTask().chat_template_kwargs == {}
    with pytest.raises(ConfigError, match="task.chat_template_kwargs=.*valid: a mapping"):
        ArithmeticTask(chat_template_kwargs="enable_thinking=false")
    with pytest.raises(ConfigError, match="sets add_generation_prompt, which the task sets itself"):
        ArithmeticTask(chat_template_kwargs={"add_generation_prompt": False})


def test_encode_items_and_seeded_limit(tok):
    task = ArithmeticTask(num_train=40, num_eval=10, seed=3, max_prompt_tokens=1000)
    examples = task.load("train")
    items = task.encode(examples, tok, limit=5, seed=0)
    assert len(items) == 5
    by_uid = {ex.uid: ex for ex in examples}
    for it in items:
        ex = by_uid[it.uid]
        assert it.prompt_text == task.format_prompt(ex, tok)
        assert tok.decode(it.input_ids) == it.prompt_text
        assert tok.decode(it.target_ids) == ex.target_text and it.reference == ex.reference
    assert [i.uid for i in task.encode(examples, tok, limit=5, seed=0)] == [i.uid for i in items]
    other = [i.uid for i in task.encode(examples, tok, limit=5, seed=1)]
    assert other != [i.uid for i in items]
    unshuffled = task.encode(examples, tok, limit=3, shuffle=False)
    assert [i.uid for i in unshuffled] == [ex.uid for ex in examples[:3]]


def test_length_filter_and_all_filtered_error(tok):
    long_ex = Example(uid="long", prompt="x" * 300, reference="1", meta={"split": "eval"})
    short_ex = Example(uid="short", prompt="y", reference="2", meta={"split": "eval"})
    task = ArithmeticTask(max_prompt_tokens=200)
    items = task.encode([long_ex, short_ex, long_ex], tok)
    assert [it.uid for it in items] == ["short"]
    assert all(len(it.input_ids) <= 200 for it in items)
    with pytest.raises(ConfigError, match=r"'arithmetic', split 'eval': all 2 loaded examples.*"
                                          r"max_prompt_tokens=200"):
        task.encode([long_ex, long_ex], tok)


# --- local real data ----------------------------------------------------------------------------
def test_gsm8k_local(shared_data, tok):
    task = GSM8KTask(source="local", path=str(shared_data / "gsm8k/test.jsonl"),
                     train_path=str(shared_data / "gsm8k/train.jsonl"))
    examples = task.load("eval")
    assert len(examples) == 1319 and task.max_new_tokens == 312
    first = examples[0]
    assert first.prompt.startswith("Janet") and first.reference == "18"
    assert "<<" not in first.target_text and first.target_text.endswith("#### 18")
    items = task.encode(examples, tok, limit=8, seed=0)
    assert len(items) == 8 and all(len(it.input_ids) <= 512 for it in items)
    assert task.score([first.target_text, "#### 17"], ["18", "18"]) == {C.ACCURACY: 0.5}
    assert len(task.load("train")) == 7473


def test_dialogsum_local(shared_data, tok):
    d = shared_data / "dialogsum"
    task = DialogSumTask(source="local", path=str(d / "dialogsum.test.jsonl"),
                         train_path=str(d / "dialogsum.dev.jsonl"))
    test = task.load("eval")
    assert len(test) == 500 and test[0].uid == "dialogsum/eval/test_0"
    assert test[0].prompt.startswith("#Person1#") and test[0].reference  # from summary1
    assert len(task.load("train")) == 500
    items = task.encode(test, tok, limit=4)
    assert 1 <= len(items) <= 4
    scores = task.score([test[0].reference], [test[0].reference])
    assert scores[C.ROUGE1] == pytest.approx(1.0) and set(scores) == set(task.quality_metrics)


def test_specbench_local_and_categories(shared_data, tok):
    path = str(shared_data / "specbench/question.jsonl")
    all_ex = SpecBenchTask(path=path).load("eval")
    assert len(all_ex) == 480
    task = SpecBenchTask(path=path, categories=["math_reasoning", "translation"])
    examples = task.load("eval")
    assert len(examples) == 160
    assert {ex.meta["category"] for ex in examples} == {"math_reasoning", "translation"}
    assert task.quality_metrics == () and task.score(["a"], ["b"]) == {}
    math = SpecBenchTask(path=path, categories=["math_reasoning"])
    ex = math.load("eval")
    assert math.quality_metrics == (C.ACCURACY,) and ex[0].reference.rstrip().endswith("#### 1000")
    assert math.score(["so #### 1000", "#### 3"], [ex[0].reference, ex[0].reference]) == {C.ACCURACY: 0.5}
    assert len(math.encode(ex, tok, limit=3)) == 3
    with pytest.raises(ConfigError, match=r"unknown specbench categories \['poetry'\].*math_reasoning"):
        SpecBenchTask(path=path, categories=["poetry"])
    with pytest.raises(ConfigError, match="no train split"):
        math.load("train")


def test_hf_source_offline_error():
    with pytest.raises(ConfigError, match="could not load HF dataset 'abisee/cnn_dailymail'.*source=local"):
        CNNDMTask(source="hf").load("eval")


# --- arithmetic generator -----------------------------------------------------------------------
_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_arithmetic_deterministic_and_disjoint():
    a = ArithmeticTask(num_train=300, num_eval=100, seed=7)
    b = ArithmeticTask(num_train=300, num_eval=100, seed=7)
    train, evl = a.load("train"), a.load("eval")
    assert [(e.prompt, e.target_text) for e in train] == [(e.prompt, e.target_text) for e in b.load("train")]
    assert [e.prompt for e in evl] == [e.prompt for e in b.load("eval")]
    assert len(train) == 300 and len(evl) == 100
    train_q = {e.prompt for e in train}
    assert len(train_q) == 300 and not train_q & {e.prompt for e in evl}
    assert [e.prompt for e in ArithmeticTask(num_train=300, seed=8).load("train")] != [e.prompt for e in train]


def test_arithmetic_answers_correct():
    task = ArithmeticTask(num_train=200, num_eval=10, seed=0)
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
           "/": lambda x, y: x / y}
    steps = set()
    for ex in task.load("train"):
        start = int(re.search(r"starts with (\d+)", ex.target_text).group(1))
        assert str(start) in ex.prompt
        total, lines = start, ex.target_text.splitlines()[1:-1]
        steps.add(len(lines))
        for line in lines:
            eqs = _EQ.findall(line)
            for x, op, y, z in eqs:
                assert ops[op](int(x), int(y)) == int(z), line
                assert int(y) > 0 and int(z) > 0
            assert int(eqs[-1][0]) == total  # each step acts on the running total
            total = int(eqs[-1][3])
        assert ex.target_text.endswith(f"#### {total}") and ex.reference == str(total)
        assert extract_answer(ex.target_text) == total
    assert steps == {2, 3, 4}
    assert task.score([e.target_text for e in task.load("eval")], [e.reference for e in task.load("eval")]) \
        == {C.ACCURACY: 1.0}


QWEN3_EXPERIMENTS = ("reference_qwen_gsm8k", "recipe_grid", "skd_speckd", "adaptive_reference")


@pytest.mark.parametrize("task", ["arithmetic", "gsm8k", "gsm8k_local", "cnn_dm", "xsum", "dialogsum", "specbench"])
def test_every_task_config_has_chat_template_kwargs(task):
    """task.chat_template_kwargs={...} works without '+' on every task; a run dir from before the key existed
    (its run_config.json lacks it) is not a changed config."""
    from conftest import compose_cfg

    from distillspec.rundir import config_changes

    cfg = compose_cfg([f"task={task}", "task.chat_template_kwargs={enable_thinking:false}"])
    assert dict(cfg.task.chat_template_kwargs) == {"enable_thinking": False}
    assert compose_cfg([f"task={task}"]).task.chat_template_kwargs is None
    assert config_changes({"task": {"name": task}}, {"task": {"name": task, "chat_template_kwargs": None}}) == []


@pytest.mark.parametrize("experiment", QWEN3_EXPERIMENTS)
def test_qwen3_experiments_state_their_thinking_mode(experiment):
    """The experiments on the Qwen3 pair turn its thinking mode off (the study's non-thinking target)."""
    from conftest import compose_cfg

    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.pair.target == "Qwen/Qwen3-4B" and cfg.task.chat_template_kwargs.enable_thinking is False
