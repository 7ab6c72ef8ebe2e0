"""Encoders: the shared contract, the spectral descriptor, the MERT path on a tiny random
HuBERT-shaped model saved to a temp folder, and the precomputed table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apex_rank.errors import CheckpointError, ConfigError, SchemaError
from apex_rank.features.encoders import (
    ENCODERS,
    OFFICIAL_FUSION_BIAS,
    OFFICIAL_FUSION_WEIGHTS,
    SPECTRAL_DIM,
    Encoder,
    EncoderSpec,
    MertConfig,
    SpectralConfig,
    SpectralEncoder,
    get_encoder,
)
from apex_rank.schemas import embeddings_frame

SR = 16_000


def _tone(freq: float, seconds: float, sr: int = SR) -> torch.Tensor:
    t = torch.arange(round(seconds * sr)) / sr
    return 0.3 * torch.sin(2 * torch.pi * freq * t)


def _check_contract(enc: Encoder, n_samples: int) -> None:
    """What every encoder must satisfy."""
    assert isinstance(enc, Encoder)
    x = torch.randn(3, n_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    out = enc.embed(x)
    assert out.shape == (3, enc.dim) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    assert torch.equal(out, enc.embed(x))  # deterministic
    assert torch.allclose(out[1:2], enc.embed(x[1:2]), atol=1e-5)  # rows are independent of the batch
    assert enc.id == f"{enc.name}:{enc.config_hash}" and len(enc.config_hash) == 12
    with pytest.raises(ConfigError, match=r"segments must be a \(b, n_samples\) tensor"):
        enc.embed(torch.zeros(n_samples))


# ----------------------------------------------------------------------------------- spectral


def test_spectral_contract_and_documented_dimension() -> None:
    enc = get_encoder("spectral")
    assert enc.dim == SPECTRAL_DIM == 238 and enc.sample_rate == SR
    _check_contract(enc, 5 * SR)


def test_spectral_chroma_finds_the_pitch_class() -> None:
    enc = SpectralEncoder()
    out = enc.embed(torch.stack([_tone(440.0, 5), _tone(261.63, 5)]))
    chroma_mean = out[:, 188:200]  # after log-mel mean/std (128) and MFCC mean/std/Δstd (60)
    assert chroma_mean[0].argmax().item() == 9  # A
    assert chroma_mean[1].argmax().item() == 0  # C


def test_spectral_ignores_zero_padding_and_handles_silence() -> None:
    enc = SpectralEncoder()
    music = _tone(330.0, 10) + 0.05 * torch.randn(10 * SR, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(music, (0, 20 * SR))
    a, b = enc.embed(music[None]), enc.embed(padded[None])
    cos = torch.nn.functional.cosine_similarity(a, b).item()
    assert cos > 0.999  # 20 s of padding barely moves the vector
    silent = enc.embed(torch.zeros(1, 30 * SR))
    assert torch.isfinite(silent).all()


def test_spectral_config_hash_tracks_what_changes_the_output() -> None:
    base = SpectralEncoder(SpectralConfig())
    assert SpectralEncoder(SpectralConfig(batch_size=2)).config_hash == base.config_hash
    other = SpectralEncoder(SpectralConfig(n_mels=32))
    assert other.config_hash != base.config_hash and other.dim == 2 * 32 + 3 * 20 + 50
    with pytest.raises(ConfigError, match="n_mfcc=40"):
        SpectralConfig(n_mels=32, n_mfcc=40)


def test_registry_errors_list_valid_names_and_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown encoder 'mfcc'; valid names: spectral, mert-v1-95m"):
        get_encoder("mfcc")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) n_bins .* valid keys: sample_rate"):
        get_encoder("spectral", {"n_bins": 3})
    assert set(ENCODERS) == {"spectral", "mert-v1-95m", "mert-v1-330m", "mert", "precomputed"}


# --------------------------------------------------------------------------------------- MERT


@pytest.fixture(scope="module")
def tiny_hubert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised HuBERT with MERT's shape in miniature: 12 layers, 75 Hz frames at 24 kHz."""
    from transformers import HubertConfig, HubertModel

    cfg = HubertConfig(
        hidden_size=32,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-hubert")
    HubertModel(cfg).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_hubert: Path) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Segments and the hidden states computed directly with transformers."""
    from transformers import HubertModel

    model = HubertModel.from_pretrained(tiny_hubert).eval()
    x = torch.randn(2, 24_000, generator=torch.Generator().manual_seed(3)) * 0.1
    with torch.no_grad():
        hs = model(x, output_hidden_states=True).hidden_states
    assert len(hs) == 13
    return x, hs


def test_mert_official_layers_and_fusion_match_a_hand_computation(tiny_hubert: Path, reference) -> None:  # type: ignore[no-untyped-def]
    x, hs = reference
    enc = get_encoder("mert", {"model": str(tiny_hubert), "device": "cpu"})
    assert enc.dim == 32 and enc.sample_rate == 24_000
    means = enc.layer_means(x)
    expected_means = torch.stack([hs[2].mean(1), hs[5].mean(1), hs[8].mean(1), hs[12].mean(1)], dim=1)
    assert torch.allclose(means, expected_means, atol=1e-5)
    w, b = OFFICIAL_FUSION_WEIGHTS, OFFICIAL_FUSION_BIAS
    by_hand = w[0] * hs[2].mean(1) + w[1] * hs[5].mean(1) + w[2] * hs[8].mean(1) + w[3] * hs[12].mean(1) + b
    assert torch.allclose(enc.embed(x), by_hand, atol=1e-5)
    assert w == (0.3822692632675171, 0.4150039553642273, -0.11713624000549316, 0.45930564403533936)
    assert b == -0.10955178737640381
    _check_contract(enc, 24_000)


def test_mert_mean_fusion_and_custom_layers(tiny_hubert: Path, reference) -> None:  # type: ignore[no-untyped-def]
    x, hs = reference
    enc = get_encoder(str(tiny_hubert), {"fusion": "mean", "layers": [0, 6, -1], "device": "cpu"})  # a folder name
    assert torch.allclose(enc.embed(x), (hs[0].mean(1) + hs[6].mean(1) + hs[12].mean(1)) / 3, atol=1e-5)
    enc = get_encoder(
        "mert",
        {
            "model": str(tiny_hubert),
            "fusion": "weights",
            "layers": [4],
            "fusion_weights": [2.0],
            "fusion_bias": 1.0,
            "device": "cpu",
        },
    )
    assert torch.allclose(enc.embed(x), 2 * hs[4].mean(1) + 1, atol=1e-5)
    official = get_encoder("mert", {"model": str(tiny_hubert), "device": "cpu"})
    assert enc.config_hash != official.config_hash


def test_mert_passes_no_attention_mask(tiny_hubert: Path) -> None:
    enc = get_encoder("mert", {"model": str(tiny_hubert), "device": "cpu"})
    seen: list[dict[str, object]] = []
    handle = enc.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        enc.embed(torch.zeros(1, 24_000))
    finally:
        handle.remove()
    assert seen and seen[0].get("attention_mask") is None and seen[0]["output_hidden_states"] is True
    assert all(not p.requires_grad for p in enc.model.parameters()) and not enc.model.training


def test_mert_bad_layers_and_fusion(tiny_hubert: Path) -> None:
    with pytest.raises(ConfigError, match=r"layer index\(es\) \[13\] do not exist: .* 13 hidden states"):
        get_encoder("mert", {"model": str(tiny_hubert), "layers": [2, 5, 8, 13], "device": "cpu"})
    with pytest.raises(ConfigError, match="fusion 'official' has 4 weights but layers=\\[2, 5\\]"):
        MertConfig(layers=(2, 5))


def test_mert_missing_model_says_how_to_obtain_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"does not exist.*huggingface-cli download m-a-p/MERT-v1-95M"):
        get_encoder("mert", {"model": str(tmp_path / "MERT-v1-95M")})
    # a hub name is only looked up in the local cache unless downloads are allowed
    with pytest.raises(CheckpointError, match=r"cannot load model 'm-a-p/MERT-v1-95M'.*--allow-download"):
        get_encoder("mert-v1-95m", {"device": "cpu"})


def test_mert_refuses_weights_that_would_be_reinitialised(tiny_hubert: Path, tmp_path: Path) -> None:
    """The reported pitfall: a checkpoint nesting the encoder under another prefix loads as random weights."""
    from safetensors.torch import load_file, save_file

    nested = tmp_path / "nested"
    nested.mkdir()
    state = load_file(str(tiny_hubert / "model.safetensors"))
    save_file({f"mert.{k}": v for k, v in state.items()}, str(nested / "model.safetensors"), metadata={"format": "pt"})
    (nested / "config.json").write_text((tiny_hubert / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"weight\(s\) missing from the checkpoint .* randomly initialised"):
        get_encoder("mert", {"model": str(nested), "device": "cpu"})


def test_mert_normalize_auto_reads_the_preprocessor_config(tiny_hubert: Path, tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    import shutil

    x, _ = reference
    folder = tmp_path / "with-pre"
    shutil.copytree(tiny_hubert, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    enc = get_encoder("mert", {"model": str(folder), "device": "cpu"})
    plain = get_encoder("mert", {"model": str(tiny_hubert), "device": "cpu"})
    z = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-7)
    assert torch.allclose(enc.embed(x), plain.embed(z), atol=1e-5)


# -------------------------------------------------------------------------------- precomputed


def test_precomputed_lookup(tmp_path: Path) -> None:
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "emb.parquet"
    embeddings_frame(["a", "b", "c"], X, encoder="external").write_parquet(path)
    enc = get_encoder("precomputed", {"path": str(path)})
    found, got, missing = enc.lookup(["c", "zz", "a"])  # type: ignore[attr-defined]
    assert found == ["c", "a"] and missing == ["zz"] and enc.dim == 4
    np.testing.assert_array_equal(got, X[[2, 0]])
    with pytest.raises(ConfigError, match="cannot embed audio"):
        enc.embed(torch.zeros(1, 10))
    with pytest.raises(SchemaError, match="does not exist"):
        get_encoder("precomputed", {"path": str(tmp_path / "none.parquet")})
    with pytest.raises(ConfigError, match="needs path="):
        EncoderSpec.of("precomputed").build()
