"""modelkiln's own probe set: text a variant is judged on besides the checkpoint's data.

A variant trained on a checkpoint's calibration text can learn that text and nothing
else: scored on rows like it, it looks faithful while it breaks other inputs. The probe
set is a second opinion the user did not have to write: a few hundred sentences of every
kind a text model meets (questions, instructions, chat, numbers and dates, code, names,
lists, long compound sentences, a few words alone), made by a fixed generator, so the
set is the same on every host and in every version of this module. Every text variant
must stay within the gate's tolerance on it too (``checks.probe_*``).

The generator composes sentences from templates and word lists written for this module;
nothing is downloaded or read from elsewhere.
"""

from __future__ import annotations

import random

import numpy as np

from ..plugins.api import MASK

# Sentences in the set; the gate's bound over this many is about a tenth of a point wide
# for a faithful int8 variant.
PROBE_COUNT = 192
SEED = 20261207

_PEOPLE = ["Maria", "the new engineer", "my grandmother", "Dr. Okafor", "the night nurse", "a customer in Lyon",
           "our landlord", "the team lead", "Kenji", "the museum guide", "two students", "the pilot",
           "a farmer near Tampere", "the support bot", "José", "the city council", "my neighbour's kid",
           "the reviewer", "Amira", "the on-call engineer"]
_THINGS = ["the invoice", "a broken umbrella", "the quarterly report", "fresh bread", "the train schedule",
           "an old laptop", "the wedding photos", "a cup of green tea", "the database backup", "her passport",
           "the blue bicycle", "a jar of honey", "the firmware update", "his left shoe", "the spare key",
           "a thunderstorm warning", "the recipe for lentil soup", "three unread emails", "the parking ticket",
           "a box of old letters", "the vaccine appointment", "the GPU cluster", "a paper map", "the rent"]
_PLACES = ["in the kitchen", "at the airport", "on the night bus", "behind the library", "in Nairobi",
           "at the back of the warehouse", "on the third floor", "near the river", "in a small café",
           "at the border crossing", "on the hiking trail", "in the server room", "at the farmers' market",
           "in the waiting room", "on the ferry to Helsinki", "under the bridge"]
_VERBS = ["found", "lost", "fixed", "forgot", "ordered", "cancelled", "painted", "shared", "rebooted", "returned",
          "borrowed", "signed", "translated", "measured", "photographed", "recommended", "deleted", "packed"]
_TIMES = ["yesterday", "this morning", "last winter", "on Friday at 9:30", "twenty minutes ago", "in 1998",
          "every other Tuesday", "before the meeting", "after midnight", "on 3 March 2024", "during the outage",
          "once a year", "right now", "since the update"]
_FEELINGS = ["annoyed", "relieved", "confused", "thrilled", "exhausted", "curious", "nervous", "grateful",
             "disappointed", "amused"]
_TOPICS = ["the weather", "tax forms", "quantum computing", "football", "gardening", "interest rates",
           "the election", "sourdough", "migraine treatment", "the printer", "train delays", "password resets",
           "climate policy", "jazz records", "bird migration", "the heat pump", "mortgage terms", "chess openings"]
_ADJECTIVES = ["cheap", "reliable", "slow", "beautiful", "confusing", "dangerous", "quiet", "expensive", "broken",
               "delicious", "outdated", "crowded", "secure", "noisy", "fragile"]
_CODE = ["for i in range(10): print(i)", "SELECT name FROM users WHERE age > 30;", "git rebase -i HEAD~3",
         "x = [n * n for n in data if n % 2 == 0]", "curl -X POST https://example.com/api/v1/items",
         "if (err != nil) { return err }", "docker run --rm -p 8080:80 nginx", "def add(a, b): return a + b",
         "ls -la /var/log | grep error", "const total = prices.reduce((a, b) => a + b, 0);"]
_WORDS = ["Thanks!", "No.", "Maybe later.", "Why?", "Good morning", "Refund please", "ok", "Help",
          "Out of stock", "See you soon", "Error 404", "Happy birthday!"]


def _pick(rng: random.Random, items: list[str]) -> str:
    return items[rng.randrange(len(items))]


def _sentence(rng: random.Random, kind: int) -> str:  # noqa: C901 - over the complexity bound, not yet split
    p, t, w, v = _pick(rng, _PEOPLE), _pick(rng, _THINGS), _pick(rng, _PLACES), _pick(rng, _VERBS)
    when, topic, adjective = _pick(rng, _TIMES), _pick(rng, _TOPICS), _pick(rng, _ADJECTIVES)
    number = rng.choice([str(rng.randrange(2, 99)), f"{rng.randrange(1, 999)}.{rng.randrange(10, 99)}",
                         f"{rng.randrange(1, 60)} percent", f"${rng.randrange(5, 5000):,}"])
    if kind == 0:
        return f"{p[0].upper() + p[1:]} {v} {t} {w} {when}."
    if kind == 1:
        return f"Where did {p} put {t}?"
    if kind == 2:
        return f"Please {rng.choice(['send', 'check', 'print', 'summarise', 'cancel'])} {t} before {when}."
    if kind == 3:
        return f"I am {_pick(rng, _FEELINGS)} about {topic}, honestly."
    if kind == 4:
        return f"The price went up by {number}, which seems {adjective} to me."
    if kind == 5:
        return f"Can you explain {topic} in simple terms?"
    if kind == 6:
        return _pick(rng, _CODE)
    if kind == 7:
        return _pick(rng, _WORDS)
    if kind == 8:
        return (f"Although {p} {v} {t} {w} {when}, nobody noticed until {_pick(rng, _PEOPLE)} asked about "
                f"{topic}, and by then the whole thing felt {adjective} and a little {_pick(rng, _FEELINGS)}.")
    if kind == 9:
        return f"{topic.capitalize()}: {adjective}, {_pick(rng, _ADJECTIVES)}, and {_pick(rng, _ADJECTIVES)}."
    if kind == 10:
        return f"hey, is {t} still {w}?? asking for {p} lol"
    if kind == 11:
        return f"Step {rng.randrange(1, 9)}: {v} {t}, then wait {number} seconds."
    if kind == 12:
        return f"Review: {rng.randrange(1, 6)}/5. The {_pick(rng, _THINGS).split()[-1]} was {adjective}."
    if kind == 13:
        return f"Is it true that {p} {v} {t} {when}?"
    if kind == 14:
        return (f"In {rng.randrange(1900, 2030)}, researchers studying {topic} reported that {number} of "
                f"participants {v} {t} {w}.")
    return f"{when.capitalize()}, {p} said: \"{_pick(rng, _WORDS)}\""


def probe_texts(count: int = PROBE_COUNT) -> list[str]:
    """The probe sentences: ``count`` distinct sentences of sixteen kinds, in turn."""
    rng = random.Random(SEED)
    texts: list[str] = []
    seen: set[str] = set()
    kind = 0
    while len(texts) < count:
        text = _sentence(rng, kind % 16)
        kind += 1
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


# Prefix of the probe rows' arrays in the inspect phase's reference file.
PREFIX = "probe:"
REFERENCE = "probe_reference"


def probe_reference(loaded, inputs: list, run_source, causal_lm: bool, longest: int) -> tuple[dict, dict]:
    """Run the original on the probe set: the arrays the reference file keeps (the probe
    rows, ``PREFIX`` + input name, and the original's ``probe_summary``) and what inspect
    records (``probes``: the metric and rows, or why there are none). Only for a
    checkpoint with a tokenizer whose rows are the model's inputs."""
    from ..targets.quality import probe_metric, probe_summary

    if loaded.tokenize is None:
        return {}, {"skipped": "the checkpoint ships no tokenizer: its inputs are not text"}
    names = [spec.name for spec in inputs]
    rows = loaded.tokenize(probe_texts(), longest)
    if sorted(rows) != sorted(names):
        return {}, {"skipped": f"the tokenizer makes {sorted(rows)}, the model takes {names}"}
    rows = {spec.name: np.ascontiguousarray(rows[spec.name].astype(spec.dtype)) for spec in inputs}
    try:
        outputs = run_source(loaded, rows)
    except Exception as exc:  # a model with a fixed sequence length, say: the samples judge it alone
        return {}, {"skipped": f"the original model fails on them ({exc})"}
    if not np.isfinite(outputs).all():
        return {}, {"skipped": "the original model's outputs on them are NaN or infinite"}
    metric = probe_metric(outputs, causal_lm, MASK in rows)
    arrays = {PREFIX + name: value for name, value in rows.items()}
    arrays[REFERENCE] = probe_summary(metric, outputs, rows.get(MASK), rows.get("input_ids"))
    return arrays, {"metric": metric, "rows": int(len(outputs))}


def probe_figures(run, arrays: dict, metric: str | None, chunk: int) -> dict:
    """The ``checks.probe_*`` of a loaded variant (``run``), or {} where inspect kept no
    probe rows (and so no ``metric``). A variant that fails on them where the original
    answered records why."""
    from ..targets import harness
    from ..targets.quality import probe_checks, probe_summary

    if REFERENCE not in arrays or metric is None:
        return {}
    rows = {name[len(PREFIX):]: value for name, value in arrays.items() if name.startswith(PREFIX)}
    try:
        outputs = harness.run_chunked(run, rows, chunk).astype(np.float32)
    except Exception as exc:
        return {"probe_error": f"{type(exc).__name__}: {exc}"[:300]}
    if outputs.shape[0] != len(arrays[REFERENCE]):
        return {"probe_error": f"{outputs.shape[0]} answers for {len(arrays[REFERENCE])} probe rows"}
    summary = probe_summary(metric, outputs, rows.get(MASK), rows.get("input_ids"))
    return probe_checks(metric, summary, arrays[REFERENCE])
