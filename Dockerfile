# The project's Airflow image: the official Airflow 3 image plus the pinned Python set.
#
# Extends apache/airflow the way its docs recommend for extra packages: install them at build
# time with pip (never with _PIP_ADDITIONAL_REQUIREMENTS, which reinstalls on every start).
# The code (dags/, include/, plugins/, the demo model) is copied in too, so the image runs on
# its own (KubernetesExecutor pods, hosts without a checkout); docker-compose.yaml mounts the
# same folders over these copies for development.
#
#   docker compose build            (or: docker build -t image-etl-airflow:3.3.2 .)
FROM apache/airflow:3.3.2-python3.11

COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/requirements/

# The official image keeps Airflow pinned; our constraints.txt pins everything else (torch and
# its CUDA wheels included) to the set the tests ran with.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/airflow/requirements/requirements.txt \
        -c /opt/airflow/requirements/constraints.txt

COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 include/ /opt/airflow/include/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 models/ /opt/airflow/models/

# The engine is found the one way it is everywhere (make, tests, Airflow's processes): the
# package installed in editable mode, here pointing at /opt/airflow/include, which
# docker-compose.yaml mounts over for development.
COPY --chown=airflow:0 pyproject.toml /opt/airflow/
RUN pip install --no-cache-dir --no-deps -e /opt/airflow

# Never download weights or fonts at run time.
ENV YOLO_OFFLINE=1 \
    IMAGE_ETL_MODEL=/opt/airflow/models/demo-yolo11n-2cls.pt
