import json

from benchmarks.tune_val import summary


def test_summary_keeps_two_settings_under_one_tag_apart(tmp_path):
    # A tag groups a sweep; each setting in it is its own row, or the table would average two students.
    line = {"tag": "t", "task": "snli_ve", "condition": "full", "method": "baseline", "seed": 1000}
    rows = [
        {**line, "overrides": ["student.arch=vilt"], "val": 0.333},
        {**line, "overrides": [], "val": 0.613},
        {**line, "overrides": [], "seed": 1001, "val": 0.6},
    ]
    path = tmp_path / "tuning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = summary(str(path)).splitlines()[2:]
    assert len(table) == 2
    assert "student.arch=vilt" in table[0] and "0.333 (0.333–0.333)" in table[0]
    assert "(defaults)" in table[1] and "1000,1001" in table[1] and "0.607 (0.600–0.613)" in table[1]
