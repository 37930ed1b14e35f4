"""The benchmarks' markdown sections: a section is read and rewritten alone, and `bench/adapt_tud.py --seeds` keeps
the rows of variants a later run did not train, each with the run it came from."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from adapt_tud import KEPT_HEAD, keep_earlier_rows  # noqa: E402
from docsection import read_section, write_section  # noqa: E402

HEAD = "| model | mAP | rank-1 | direct transfer mAP | training seconds (first to last record) | paper (mAP / rank-1) |"


def section(run: str, rows: dict[str, str]) -> str:
    return "\n".join(["## S", "", f"`python bench/adapt_tud.py {run}`, 2026-12-03 10:00 UTC.", "", HEAD, "|---|---|---|---|---|---|",
                      "| ImageNet features only (MobileNetV2 + GAP, no training) | 44.1 | 59.2 | | | |",
                      *(f"| variant {n} (`{n}`) | {m} | 60.0 ± 1.0 | 44.2 ± 1.1 | 300 | not in the papers |"
                        for n, m in rows.items())]) + "\n"


def test_a_section_is_read_and_replaced_alone(tmp_path):
    out = tmp_path / "r.md"
    out.write_text("# R\n\n## A\n\na text\n\n## S\n\nold\n\n### S's own part\n\nstill S\n\n## B\n\nb text\n")
    assert read_section(out, "## S") == "## S\n\nold\n\n### S's own part\n\nstill S\n\n"
    assert read_section(out, "## missing") is None
    write_section(out, "## S", "## S\n\nnew\n")
    assert out.read_text() == "# R\n\n## A\n\na text\n\n## S\n\nnew\n\n## B\n\nb text\n"


def test_rows_of_variants_not_run_again_are_kept_with_their_run():
    first = section("--variants a b", {"a": "50.0 ± 2.0", "b": "51.0 ± 3.0"})
    second = keep_earlier_rows(first, section("--variants b", {"b": "55.0 ± 1.0"}))
    lines = second.splitlines()
    rows = [line for line in lines if line.startswith("| variant")]
    assert rows == ["| variant b (`b`) | 55.0 ± 1.0 | 60.0 ± 1.0 | 44.2 ± 1.1 | 300 | not in the papers |",
                    "| variant a (`a`) | 50.0 ± 2.0 | 60.0 ± 1.0 | 44.2 ± 1.1 | 300 | not in the papers |"]
    assert lines[lines.index(KEPT_HEAD) + 2] == "- `a`: `python bench/adapt_tud.py --variants a b`, 2026-12-03 10:00 UTC."

    third = keep_earlier_rows(second, section("--variants c", {"c": "60.0 ± 4.0"})).splitlines()
    assert [line.split("(`")[1][0] for line in third if line.startswith("| variant")] == ["c", "b", "a"]
    kept = third[third.index(KEPT_HEAD) + 2:]
    assert kept == ["- `b`: `python bench/adapt_tud.py --variants b`, 2026-12-03 10:00 UTC.",
                    "- `a`: `python bench/adapt_tud.py --variants a b`, 2026-12-03 10:00 UTC."]
    assert third.count(KEPT_HEAD) == 1


def test_a_run_of_every_variant_again_keeps_nothing():
    first = section("--variants a", {"a": "50.0 ± 2.0"})
    again = section("--variants a", {"a": "52.0 ± 2.0"})
    assert keep_earlier_rows(first, again) == again


def test_the_shipped_methods_ablations_change_one_part_of_it_and_have_their_own_section():
    from adapt_tud import ABLATION_SECTION, SHIPPED_ABLATIONS, TCAP_ABLATIONS, VARIANTS, seeds_section

    shipped = VARIANTS["tcap-pku-dsbn"][1]
    assert len(SHIPPED_ABLATIONS) == len(TCAP_ABLATIONS)
    for name, (_, cfg) in SHIPPED_ABLATIONS.items():
        change = TCAP_ABLATIONS[name.replace("tcap-pku-dsbn-", "tcap-")][1]
        assert cfg == {**shipped, "tcap": change}  # the sources, BatchNorm per domain and schedule kept
        assert seeds_section([name]) == ABLATION_SECTION
    assert seeds_section(["tcap-pku-dsbn"]) != ABLATION_SECTION
