"""Composition probe: does the model read a colour-shape pair it never saw, in either direction?

For single-object images (test split: seen pairs and the held-out pairs), every caption "a picture of
a(n) <colour> <shape>" of the world is scored under the model both ways:

- caption direction, log p(caption | image): what a left-to-right captioner ranks;
- image direction, log p(image | caption): how well the caption explains the image (noisy channel).

Per direction: exact (the best of all colour x shape captions is the truth), colour and shape of the
best caption, ``shape | true colour`` (best shape among captions with the true colour: the captioner's
situation after it wrote the colour) and ``shape | other colour`` (the same after each wrong colour,
averaged). A captioner whose text prior forbids an unseen pair shows ``shape | true colour`` near 0
on held-out images while ``shape | other colour`` stays high (README Results, session 9).
"""

from __future__ import annotations

import itertools

from tqdm.auto import tqdm

from chameleon_lite.data.shapes import COLOURS, SHAPES, SceneSpec, ShapesWorld, canonical_caption

DIRECTIONS = {"caption": "image -> caption", "image": "caption -> image"}  # table labels (no "|")
METRICS = ("exact", "colour", "shape", "shape_given_true_colour", "shape_given_other_colour")


def single_object_samples(world: ShapesWorld, n_per_group: int, max_draws: int = 20_000) -> list:
    """Up to ``n_per_group`` seen-pair and ``n_per_group`` held-out single-object samples of ``world``'s
    split (same seed, holdouts and layout; held-out ones exist in test and, with val pairs, in val), in
    index order."""
    singles = ShapesWorld(seed=world.seed, image_size=world.image_size, split=world.split, length=max_draws,
                          holdout_pairs=world.holdout_pairs, category_weights={"single_object": 1},
                          heldout_fraction=world.heldout_fraction, layout=world.layout,
                          val_holdout_pairs=world.val_holdout_pairs)
    groups: dict[bool, list] = {False: [], True: []}
    for i in range(max_draws):
        sample = singles[i]
        if len(groups[sample.heldout]) < n_per_group:
            groups[sample.heldout].append(sample)
        if all(len(g) >= n_per_group for g in groups.values()) or (not singles.has_heldout and
                                                                   len(groups[False]) >= n_per_group):
            break
    return groups[False] + groups[True]


def run_composition_probe(gen, world: ShapesWorld, n_per_group: int, batch_size: int = 8) -> tuple[dict, list, list]:
    """Returns (summary, records, examples): summary[group][direction][metric], group "seen" | "heldout"."""
    samples = single_object_samples(world, n_per_group)
    colours, shapes = list(COLOURS), list(SHAPES)
    pairs = list(itertools.product(colours, shapes))
    texts = [f"a picture of {canonical_caption(SceneSpec(((c, s, 1),)))}" for c, s in pairs]  # "an orange ..."
    records, examples = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="composition probe", unit="batch"):
        chunk = samples[start:start + batch_size]
        codes = gen.tok.encode_images([s.image for s in chunk]).repeat_interleave(len(pairs), 0)
        rows = texts * len(chunk)
        scores = {"caption": gen.prompt_log_likelihood(rows, codes), "image": gen.image_log_likelihood(rows, codes)}
        for j, sample in enumerate(chunk):
            key = sample.objects[0].key
            tc, ts = colours.index(key.colour), shapes.index(key.shape)
            record = {"truth": f"{key.colour} {key.shape}", "heldout": sample.heldout}
            for direction, flat in scores.items():
                table = flat[j * len(pairs):(j + 1) * len(pairs)].view(len(colours), len(shapes))
                best_c, best_s = divmod(int(table.argmax()), len(shapes))
                others = [int(table[c].argmax()) == ts for c in range(len(colours)) if c != tc]
                record[direction] = {
                    "reading": f"{colours[best_c]} {shapes[best_s]}",
                    "exact": best_c == tc and best_s == ts, "colour": best_c == tc, "shape": best_s == ts,
                    "shape_given_true_colour": int(table[tc].argmax()) == ts,
                    "shape_given_other_colour": sum(others) / len(others),
                }
            records.append(record)
            title = (f"{record['truth']}{' (held out)' if sample.heldout else ''}\n"
                     f"caption dir: {record['caption']['reading']}\nimage dir: {record['image']['reading']}")
            examples.append((sample.image, title))
    summary = {}
    for group, held in (("seen", False), ("heldout", True)):
        chosen = [r for r in records if r["heldout"] == held]
        summary[group] = {"n": len(chosen)}
        for direction in DIRECTIONS:
            summary[group][direction] = {m: (sum(float(r[direction][m]) for r in chosen) / len(chosen) if chosen
                                             else None) for m in METRICS}
    return summary, records, examples


def probe_rows(summary: dict) -> list[dict]:
    """Rows for the Markdown table: one per (group, direction)."""
    rows = []
    for group in ("seen", "heldout"):
        for direction, label in DIRECTIONS.items():
            values = summary[group][direction]
            rows.append({"pairs": group, "n": summary[group]["n"], "direction": label,
                         **{m: "-" if values[m] is None else values[m] for m in METRICS}})
    return rows
