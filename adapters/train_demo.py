"""Train the three demo LoRA adapters (shout, json, french) for the embedded SmolLM2-135M-Instruct.

    .venv/bin/python adapters/train_demo.py --out adapters/demo --steps 60

Everything is synthesized locally: a fixed list of short user questions, the base model's own greedy
answers (upper-cased for `shout`, wrapped as {"answer": ...} for `json`) and hand-written French answers
for `french`. Each adapter is PEFT LoRA r=8 on q_proj+v_proj (alpha 16, no bias), trained on the
chat-template conversation with the loss on the assistant tokens only, and saved in float16.
Afterwards every adapter is reloaded with PeftModel.from_pretrained and compared with the base model on
held-out questions (greedy decoding). Seeds are fixed, so a rerun reproduces the same adapters on the
same machine/torch version. Run from the repository root (it imports mux.model.loader).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mux.model.loader import default_model_dir

# (user question, hand-written French answer). The questions double as the shout/json training prompts.
TRAIN: list[tuple[str, str]] = [
    ("What is the capital of France?", "La capitale de la France est Paris."),
    ("How many days are in a week?", "Il y a sept jours dans une semaine."),
    ("What color is the sky on a clear day?", "Par temps clair, le ciel est bleu."),
    ("Hello!", "Bonjour ! Comment puis-je vous aider aujourd'hui ?"),
    ("Hi, how are you?", "Je vais très bien, merci ! Et vous ?"),
    ("Good morning!", "Bonjour ! Je vous souhaite une excellente journée."),
    ("What is the largest planet in our solar system?", "La plus grande planète du système solaire est Jupiter."),
    ("Who wrote Romeo and Juliet?", "Roméo et Juliette a été écrit par William Shakespeare."),
    ("What is water made of?", "L'eau est composée d'hydrogène et d'oxygène : sa formule est H2O."),
    (
        "How do I boil an egg?",
        "Plongez l'œuf dans l'eau bouillante et laissez-le cuire environ neuf minutes pour obtenir un œuf dur.",
    ),
    (
        "How can I improve my sleep?",
        "Couchez-vous à heure fixe, évitez les écrans le soir et gardez votre chambre fraîche et sombre.",
    ),
    (
        "What is photosynthesis?",
        "La photosynthèse est le processus par lequel les plantes transforment la lumière du soleil, "
        "l'eau et le dioxyde de carbone en sucre et en oxygène.",
    ),
    ("How many continents are there?", "Il y a sept continents sur la Terre."),
    ("What is the boiling point of water?", "L'eau bout à 100 degrés Celsius au niveau de la mer."),
    (
        "Can you recommend a good book?",
        "Je vous recommande « Le Petit Prince » d'Antoine de Saint-Exupéry, un livre court et magnifique.",
    ),
    ("What is the tallest mountain in the world?", "La plus haute montagne du monde est l'Everest, avec 8 849 mètres."),
    (
        "How do I make a paper airplane?",
        "Pliez une feuille en deux, rabattez les coins vers le pli central, puis pliez les ailes de chaque côté.",
    ),
    ("What is the speed of light?", "La lumière se déplace à environ 300 000 kilomètres par seconde."),
    (
        "Why is exercise important?",
        "L'exercice renforce le cœur, les muscles et le moral, et il aide à rester en bonne santé.",
    ),
    ("What is the chemical symbol for gold?", "Le symbole chimique de l'or est Au."),
    ("Thank you for your help!", "Avec plaisir ! N'hésitez pas si vous avez d'autres questions."),
    ("What is 2 plus 2?", "Deux plus deux font quatre."),
    ("Who painted the Mona Lisa?", "La Joconde a été peinte par Léonard de Vinci."),
    ("How do plants grow?", "Les plantes poussent grâce à la lumière, à l'eau et aux nutriments du sol."),
    (
        "What is the longest river in the world?",
        "Le Nil est généralement considéré comme le plus long fleuve du monde.",
    ),
    (
        "How can I learn to code?",
        "Commencez par un langage simple comme Python, suivez un cours en ligne et pratiquez chaque jour "
        "avec de petits projets.",
    ),
    ("What is the moon?", "La Lune est le satellite naturel de la Terre."),
    (
        "How do I wash my hands properly?",
        "Mouillez vos mains, savonnez-les pendant vingt secondes, rincez-les puis séchez-les "
        "avec une serviette propre.",
    ),
    ("What is the main language spoken in Brazil?", "La langue principale du Brésil est le portugais."),
    ("Tell me a fun fact.", "Les pieuvres ont trois cœurs et du sang bleu !"),
    ("What do bees make?", "Les abeilles fabriquent du miel et de la cire."),
    ("How many legs does a spider have?", "Une araignée a huit pattes."),
    ("What is the freezing point of water?", "L'eau gèle à 0 degré Celsius."),
    (
        "How do I save money?",
        "Fixez-vous un budget, notez vos dépenses et mettez de côté une petite somme chaque mois.",
    ),
    (
        "What is gravity?",
        "La gravité est la force qui attire les objets les uns vers les autres, "
        "comme une pomme qui tombe vers la Terre.",
    ),
    (
        "Who was the first person to walk on the moon?",
        "Neil Armstrong a été le premier homme à marcher sur la Lune, en 1969.",
    ),
    ("What is the smallest prime number?", "Le plus petit nombre premier est deux."),
    (
        "How do I stay focused while studying?",
        "Travaillez dans un endroit calme, éteignez votre téléphone et faites une courte pause "
        "toutes les quarante-cinq minutes.",
    ),
    ("What is the capital of Italy?", "La capitale de l'Italie est Rome."),
    ("What animal is known as the king of the jungle?", "Le lion est surnommé le roi de la jungle."),
    ("How many hours are in a day?", "Il y a vingt-quatre heures dans une journée."),
    ("What is a computer?", "Un ordinateur est une machine qui traite des informations en suivant des instructions."),
    (
        "How do I cook rice?",
        "Rincez le riz, faites-le cuire dans deux fois son volume d'eau pendant environ quinze minutes, "
        "puis laissez-le reposer.",
    ),
    ("What is the weather like in summer?", "En été, il fait généralement chaud et ensoleillé."),
    ("Goodbye!", "Au revoir ! Passez une très bonne journée."),
    ("What is the sun?", "Le Soleil est une étoile qui nous apporte la lumière et la chaleur."),
    (
        "Why do we need to drink water?",
        "Notre corps a besoin d'eau pour réguler sa température, transporter les nutriments et bien fonctionner.",
    ),
    ("What is the capital of Spain?", "La capitale de l'Espagne est Madrid."),
    ("Can you help me write an email?", "Bien sûr ! Dites-moi à qui vous écrivez et ce que vous voulez dire."),
    (
        "What is a healthy breakfast?",
        "Un petit-déjeuner sain peut comprendre des flocons d'avoine, des fruits, un yaourt et un verre d'eau.",
    ),
    (
        "How do airplanes fly?",
        "Les avions volent grâce à leurs ailes, qui créent une portance lorsque l'air circule autour d'elles.",
    ),
    ("What is the biggest ocean?", "Le plus grand océan est l'océan Pacifique."),
    (
        "How do I tie my shoes?",
        "Faites un premier nœud, formez une boucle avec un lacet, enroulez l'autre autour, puis tirez-le à travers.",
    ),
    (
        "What is democracy?",
        "La démocratie est un système politique dans lequel le pouvoir appartient au peuple, "
        "qui vote pour choisir ses dirigeants.",
    ),
    ("Who invented the telephone?", "L'invention du téléphone est attribuée à Alexander Graham Bell, en 1876."),
    ("What's your name?", "Je m'appelle SmolLM, un assistant créé par Hugging Face."),
]

# Never trained on: used only for the before/after comparison.
HELD_OUT = [
    "What is the capital of Japan?",
    "How do I make a cup of tea?",
    "Why do cats purr?",
]

ADAPTERS = ("shout", "json", "french")
DESCRIPTIONS = {
    "shout": "answers in ALL CAPS",
    "json": 'answers as a JSON object {"answer": "..."}',
    "french": "answers in French",
}
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # written into adapter_config.json (informational only)
TARGET_MODULES = ["q_proj", "v_proj"]
GEN_TOKENS = 40
FRENCH_WORDS = {"le", "la", "les", "est", "et", "de", "des", "une", "un", "pour", "dans", "vous", "avec", "du", "sont"}


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_base(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def prompt_ids(tok, question: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


@torch.no_grad()
def generate(model, tok, questions: list[str], max_new_tokens: int = GEN_TOKENS, batch_size: int = 8) -> list[str]:
    """Greedy answers, batched with left padding."""
    out: list[str] = []
    eos = tok.eos_token_id
    for i in range(0, len(questions), batch_size):
        batch = [prompt_ids(tok, q) for q in questions[i : i + batch_size]]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=eos,
        )
        for row in gen[:, width:]:
            out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


def trim_answer(text: str) -> str:
    """One line of text, cut after the last complete sentence when generation hit the token limit."""
    text = " ".join(text.split())
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if text and text[-1] not in ".!?" and cut > 20:
        text = text[: cut + 1]
    return text


def build_targets(kind: str, base_answers: list[str]) -> list[tuple[str, str]]:
    if kind == "french":
        return list(TRAIN)
    pairs = [(q, trim_answer(a)) for (q, _), a in zip(TRAIN, base_answers, strict=True)]
    if kind == "shout":
        return [(q, a.upper()) for q, a in pairs]
    if kind == "json":
        return [(q, json.dumps({"answer": a}, ensure_ascii=False)) for q, a in pairs]
    raise ValueError(kind)


def encode(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels): the chat prompt is masked with -100; the answer + <|im_end|> is learned."""
    data = []
    for question, answer in pairs:
        p = prompt_ids(tok, question)
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        data.append((p + a, [-100] * len(p) + a))
    return data


def collate(items, pad_id: int):
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, labels


def train_one(kind: str, model_dir: Path, tok, pairs, args) -> None:
    seed_all(args.seed)
    base = load_base(model_dir)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    data = encode(tok, pairs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(args.seed)
    order: list[int] = []
    model.train()
    t0 = time.time()
    running = None
    for step in range(args.steps):
        if len(order) < args.batch_size:
            epoch = list(range(len(data)))
            rng.shuffle(epoch)
            order += epoch
        batch, order = [data[i] for i in order[: args.batch_size]], order[args.batch_size :]
        ids, mask, labels = collate(batch, tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 10 == 0 or step == args.steps - 1:
            print(
                f"[{kind}] step {step + 1:4d}/{args.steps} loss {loss.item():.4f} (avg {running:.4f}) "
                f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:6.1f}s",
                flush=True,
            )
    model.eval()
    for name, p in model.named_parameters():  # the LoRA weights only; the base is never saved
        if "lora_" in name:
            p.data = p.data.to(torch.float16)
    out_dir = Path(args.out) / kind
    model.save_pretrained(out_dir)
    tidy_adapter_dir(out_dir)
    print(f"[{kind}] trained in {time.time() - t0:.1f}s, saved to {out_dir}", flush=True)


def tidy_adapter_dir(out_dir: Path) -> None:
    """Drop PEFT's boilerplate model card and the machine-local base path from adapter_config.json."""
    (out_dir / "README.md").unlink(missing_ok=True)
    cfg_file = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = BASE_MODEL_ID
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def looks_shout(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) / len(letters) > 0.9


def looks_json(text: str) -> bool:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:  # an object cut off by the token limit still shows the format
        return text.startswith('{"answer": "')
    return isinstance(obj, dict) and isinstance(obj.get("answer"), str)


def looks_french(text: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", text.lower())
    return bool(words) and sum(w in FRENCH_WORDS for w in words) / len(words) > 0.15


CHECKS = {"shout": looks_shout, "json": looks_json, "french": looks_french}


def evaluate(model_dir: Path, tok, kinds, out: Path) -> dict:
    base = load_base(model_dir)
    samples = {"base": generate(base, tok, HELD_OUT)}
    del base
    for kind in kinds:
        model = PeftModel.from_pretrained(load_base(model_dir), out / kind)
        model.eval()
        samples[kind] = generate(model, tok, HELD_OUT)
    for i, q in enumerate(HELD_OUT):
        print(f"\n=== held-out Q: {q}")
        print(f"  base  : {samples['base'][i]!r}")
        for kind in kinds:
            ok = CHECKS[kind](samples[kind][i])
            print(f"  {kind:6}: {samples[kind][i]!r}  [{'ok' if ok else 'NOT ' + kind}]")
    return samples


def write_readme(out: Path, kinds, samples: dict, args, seconds: dict) -> None:
    lines = [
        "# Demo LoRA adapters for SmolLM2-135M-Instruct",
        "",
        "Three tiny style adapters for the embedded base model (`SmolLM2-135M-Instruct`), for trying lora-mux.",
        "",
        "| adapter | behaviour |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {DESCRIPTIONS[k]} |" for k in kinds]
    lines += [
        "",
        "## How they were made",
        "",
        "```",
        f"python adapters/train_demo.py --out {args.out} --steps {args.steps}",
        "```",
        "",
        f"PEFT LoRA, r={args.rank}, lora_alpha=16, target_modules={TARGET_MODULES}, bias none, saved in float16. "
        f"{len(TRAIN)} short questions written in the script (general knowledge, greetings, how-to). "
        "`shout` and `json` learn the base model's own greedy answers (≤40 tokens, cut at the last full sentence), "
        'upper-cased or wrapped as `json.dumps({"answer": ...})`; `french` learns hand-written French answers. '
        "Loss on the assistant tokens only (chat template incl. its default system prompt), "
        f"AdamW lr {args.lr}, batch {args.batch_size}, {args.steps} steps, seed {args.seed}, CPU fp32.",
        "",
        "Training time on a busy 2-core CPU with 1 torch thread (2 threads were ~10x slower there): "
        + ", ".join(f"{k} {seconds[k]:.0f}s" for k in kinds if k in seconds)
        + ".",
        "",
        "Each folder holds `adapter_config.json` + `adapter_model.safetensors` (fp16, 120 tensors, ~0.9 MB).",
        "",
        "## Held-out samples (greedy, 40 new tokens, questions not in the training data)",
        "",
        "These are demos of a visible style change, not quality adapters: a 135M model with attention-only "
        "rank-8 LoRA and a minute or two of CPU training keeps the style but often loses content "
        "(repetition in `shout`, broken French, made-up facts). Outputs cut at 40 tokens may end mid-sentence "
        '(a JSON object then lacks its closing `"}`).',
        "",
    ]
    for i, q in enumerate(HELD_OUT):
        lines.append(f"**{q}**")
        lines.append("")
        for kind in ("base", *kinds):
            lines.append(f"- {kind}: `{samples[kind][i]}`")
        lines.append("")
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="adapters/demo")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per adapter")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--only", nargs="+", choices=ADAPTERS, default=list(ADAPTERS))
    ap.add_argument("--eval-only", action="store_true", help="skip training; compare the saved adapters")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.rank <= 8:
        ap.error("--rank must be 1..8")
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    out = Path(args.out)
    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    seconds: dict[str, float] = {}
    if not args.eval_only:
        base_answers: list[str] = []
        if {"shout", "json"} & set(args.only):
            t0 = time.time()
            base_answers = generate(load_base(model_dir), tok, [q for q, _ in TRAIN])
            print(f"base answers for {len(TRAIN)} questions in {time.time() - t0:.1f}s", flush=True)
        for kind in args.only:
            pairs = build_targets(kind, base_answers)
            print(f"[{kind}] example: {pairs[0][0]!r} -> {pairs[0][1]!r}", flush=True)
            t0 = time.time()
            train_one(kind, model_dir, tok, pairs, args)
            seconds[kind] = time.time() - t0
    kinds = [k for k in ADAPTERS if (out / k / "adapter_config.json").is_file()]
    samples = evaluate(model_dir, tok, kinds, out)
    if not args.eval_only and not args.no_readme:
        write_readme(out, kinds, samples, args, seconds)


if __name__ == "__main__":
    main()
