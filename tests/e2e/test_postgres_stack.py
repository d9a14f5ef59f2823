"""The PostgreSQL-backed stack (tests/e2e/conftest.py `pg_stack`): both servers keep their state in
PostgreSQL. Its own file: it starts its own stack, so it can run beside the SQLite stack's tests."""
from __future__ import annotations

import pytest

from tests.e2e.test_stack import BUDGET_S, aliases, assert_completed

pytestmark = pytest.mark.e2e


@pytest.mark.postgres
def test_train_on_the_postgresql_stack(pg_stack, churn_csv):
    model = "e2e_churn_pg"
    proc = pg_stack.run_deployment("train-model/default", {
        "data": str(churn_csv), "target": "churn", "model_name": model, "time_budget_s": BUDGET_S})
    assert_completed(pg_stack, proc)
    assert aliases(pg_stack, model) == {"champion": 1}

    # Both servers really keep their state in PostgreSQL.
    import psycopg2

    settings = pg_stack.env
    for url, query in ((settings["MLFLOW_BACKEND_STORE_URI"],
                        "SELECT count(*) FROM model_versions WHERE name = %s"),
                       (settings["PREFECT_DATABASE_URL"],
                        "SELECT count(*) FROM flow_run WHERE parameters->>'model_name' = %s")):
        dbname = url.rsplit("/", 1)[1]
        with psycopg2.connect(dbname=dbname, user="postgres", host="127.0.0.1", port=5432) as conn:
            with conn.cursor() as cur:
                cur.execute(query, (model,))
                assert cur.fetchone()[0] == 1, (dbname, query)
