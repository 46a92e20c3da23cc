"""Planning the Criteo 1TB tables on paper: nothing allocated, TorchRec's planner places the compressed sizes."""

from __future__ import annotations

from experiments.checks.scale import CRITEO_1TB, format_table, plan_at_scale


def test_criteo_1tb_plan_fits_hosts_and_uses_compressed_sizes():
    assert sum(CRITEO_1TB) == 882_774_559
    rows = plan_at_scale(["hash", "unified"], ["1/1000"], hosts=8, memory_per_host=64 * 2**30)
    full_bytes = 882_774_559 * 128 * 4
    for row in rows:
        assert row.total_bytes <= full_bytes // 1000
        assert row.max_rank_bytes is not None and 0 < row.max_rank_bytes <= 64 * 2**30
        # the planner saw the compressed tables: no host holds more than the whole compressed module
        assert row.max_rank_bytes <= row.total_bytes
    assert "| hash | 1/1000 |" in format_table(rows, 8, 64 * 2**30)


def test_full_tables_do_not_fit_small_hosts():
    (row,) = plan_at_scale(["full"], hosts=2, memory_per_host=16 * 2**30)
    assert row.max_rank_bytes is None and "no sharding plan" in row.note
