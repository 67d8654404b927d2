"""image_etl: nightly image drops → YOLO on every device → result rows.

Plain Python, no Airflow imports: the DAG in ``dags/`` and the CLI (``python -m image_etl``)
are two thin front ends over the same stages.
"""

__version__ = "0.1.0"
