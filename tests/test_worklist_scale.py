"""The worklist query stays an index scan at 100k studies on PostgreSQL (the production backend)."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.dialects import postgresql

from app.worklist import worklist_order, worklist_query

STUDIES = 100_000


def test_worklist_first_page_uses_the_index_at_100k_studies(pg_url: str) -> None:
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO studies (study_uid, state, version, first_received_at, last_received_at, instance_count,
                                 priority, severity)
            SELECT '9.9.' || g, CASE WHEN g % 10 = 0 THEN 'receiving' ELSE 'scored' END, 1,
                   now() - (g || ' seconds')::interval, now(), 100,
                   CASE WHEN g % 10 = 0 THEN NULL ELSE (g % 5) * 1000 + (g % 97) END, (g % 100)
            FROM generate_series(1, :n) AS g
        """), {"n": STUDIES})
        conn.execute(text("ANALYZE studies"))
    query = worklist_query().order_by(*worklist_order()).limit(50)
    sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    try:
        with engine.connect() as conn:
            plan = "\n".join(conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")).scalars())
            first = conn.execute(text(sql)).first()
        print(plan)  # the bench note: pytest -s shows it
        assert "ix_studies_worklist_pg" in plan, plan
        assert "Sort" not in plan.split("\n")[1], plan  # no sort of the whole table above the scan
        assert first is not None and first.priority == 4 * 1000 + 96  # the highest generated priority
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM studies WHERE study_uid LIKE '9.9.%'"))
        engine.dispose()
