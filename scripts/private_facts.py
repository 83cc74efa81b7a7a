"""The personal-assistant demo of docs/FINETUNING.md: a fictional company's private facts.

    python scripts/private_facts.py make OUTDIR            # OUTDIR/train.jsonl (chat) + OUTDIR/heldout.jsonl
    python scripts/private_facts.py eval OUTDIR [--adapter DIR]  # exact-answer accuracy on held-out paraphrases

Training questions use three phrasings per fact; the held-out questions use two other phrasings never trained on.
An answer counts when the generated reply contains the fact's value (case-insensitive).

Choosing training settings without looking at the held-out set: `make` also writes OUTDIR/dev/, whose train.jsonl
has only the first two training phrasings and whose heldout.jsonl asks the third; `eval OUTDIR/dev` scores a
candidate setting there, then the chosen one is trained on all three and evaluated once on OUTDIR/heldout.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Maren", "Tobiah", "Ilse", "Quentin", "Zofia", "Anselm", "Brielle", "Casimir", "Delphine", "Evander",
         "Fenna", "Gideon"]
LAST = ["Okonkwo", "Varga", "Lindqvist", "Ferreira", "Nakashima", "Brandt", "Moreau", "Kowalczyk", "Achterberg",
        "Delacroix", "Halvorsen", "Szabo"]
ROOMS = ["Room Juniper", "Room Basalt", "Room Cobalt", "Room Saffron", "Room Tundra", "Room Quartz", "Room Maple",
         "Room Onyx", "Room Harbor", "Room Lumen", "Room Fjord", "Room Cinder"]
TEAMS = ["Team Heron", "Team Falcon", "Team Otter", "Team Lynx", "Team Badger", "Team Marten"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]

TRAIN_Q = {
    "room": ["Which room is {p}'s office at Zephyrine Labs?", "Where does {p} sit at Zephyrine Labs?",
             "What is the office room of {p} at Zephyrine Labs?"],
    "team": ["Which team is {p} on at Zephyrine Labs?", "What team does {p} belong to at Zephyrine Labs?",
             "{p} works in which team at Zephyrine Labs?"],
    "day": ["On which day does {p} hold office hours at Zephyrine Labs?",
            "When are {p}'s weekly office hours at Zephyrine Labs?",
            "What weekday are {p}'s office hours at Zephyrine Labs?"],
}
HELDOUT_Q = {
    "room": ["At Zephyrine Labs, in what room can I find {p}?", "Tell me the room where {p} works at Zephyrine Labs."],
    "team": ["At Zephyrine Labs, {p} is a member of which team?", "Name the Zephyrine Labs team of {p}."],
    "day": ["At Zephyrine Labs, what day of the week does {p} have office hours?",
            "Tell me the office-hours day of {p} at Zephyrine Labs."],
}
ANSWER = {"room": "{p}'s office is {v}.", "team": "{p} is on {v}.", "day": "{p} holds office hours on {v}."}


def facts(seed: int = 0, people: int = 12) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    rooms = rng.sample(ROOMS, people)
    out = []
    for i in range(people):
        p = f"{FIRST[i]} {LAST[i]}"
        out += [(p, "room", rooms[i]), (p, "team", rng.choice(TEAMS)), (p, "day", rng.choice(DAYS))]
    return out


def write(out: Path, train_q: dict[str, list[str]], heldout_q: dict[str, list[str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for p, kind, v in facts():
            for q in train_q[kind]:
                msgs = [{"role": "user", "content": q.format(p=p)},
                        {"role": "assistant", "content": ANSWER[kind].format(p=p, v=v)}]
                f.write(json.dumps({"messages": msgs}) + "\n")
    with open(out / "heldout.jsonl", "w") as f:
        for p, kind, v in facts():
            for q in heldout_q[kind]:
                f.write(json.dumps({"question": q.format(p=p), "answer": v}) + "\n")


def make(out: Path) -> None:
    write(out, TRAIN_Q, HELDOUT_Q)
    write(out / "dev", {k: v[:2] for k, v in TRAIN_Q.items()}, {k: v[2:] for k, v in TRAIN_Q.items()})


def evaluate(out: Path, adapter: str | None, model: str | None) -> float:
    import edgellm

    llm = edgellm.load(model, adapter=adapter)
    items = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    right = 0
    for it in items:
        reply = llm.chat([{"role": "user", "content": it["question"]}], max_new_tokens=16)
        right += it["answer"].lower() in reply.lower()
    acc = right / len(items)
    print(json.dumps({"adapter": adapter, "correct": right, "total": len(items), "accuracy": round(acc, 4),
                      "example": {"q": items[0]["question"], "a": items[0]["answer"],
                                  "reply": llm.chat([{"role": "user", "content": items[0]["question"]}],
                                                    max_new_tokens=16)}}))
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("action", choices=["make", "eval"])
    ap.add_argument("out")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    make(Path(a.out)) if a.action == "make" else evaluate(Path(a.out), a.adapter, a.model)


if __name__ == "__main__":
    main()
