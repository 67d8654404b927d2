"""Airflow glue of the image_etl pipeline (operators, triggers). The engine, ``image_etl``,
imports no Airflow; what needs Airflow's classes lives here, as thin as it can be."""
