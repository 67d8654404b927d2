"""The FastAPI app behind the Detections page (mounted by the api-server at ``/detections``).

    /                        the page (static/index.html; the view is in its query string)
    /static/{app.js,app.css} its script and style, from a fixed table (no StaticFiles mount)
    /api/models              models with results
    /api/nights              per-night totals of a model, the last N nights
    /api/night               one night's totals
    /api/images              a night's or a run's images, by detection count, filterable
    /api/failures            a night's failed images with their reasons
    /api/images/{id}         one image and its detections
    /api/images/{id}/thumbnail    a size-capped JPEG (cached under the output folder)
    /api/images/{id}/region       a native-resolution crop, size-capped
    /api/run                 one DAG run's images and counts

Every route depends on ``auth.require_reader`` (401 / 403 before anything else runs). Image
bytes come only from the file the image's row records, confined to its drop folder
(``image_etl.thumbnails.open_confined``); no path is ever taken from a request. Bad parameters
are 400, unknown ids 404. The page's links and fetches are relative, so it works under any
``base_url`` sub-path.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from image_etl_detections import DAG_ID, pictures, results_db

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# Scripts and styles from this app only, nothing from elsewhere; framed only by the Airflow UI.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'self'")

Model = Annotated[str, Query(pattern=r"^[0-9a-f]{64}$", description="the model's sha256")]
Day = Annotated[dt.date, Query(description="the drop date, YYYY-MM-DD")]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]
ClassName = Annotated[str | None, Query(min_length=1, max_length=200)]
MinConf = Annotated[float | None, Query(ge=0, le=1)]
RunId = Annotated[str, Query(min_length=1, max_length=250)]
ImageId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


def create_app() -> FastAPI:
    # Here, not at the top: auth imports Airflow's API security module (hundreds of modules).
    from image_etl_detections.auth import require_reader

    app = FastAPI(title="Detections", dependencies=[Depends(require_reader)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.middleware("http")(_headers)
    _page_routes(app)
    _data_routes(app)
    _image_routes(app)
    return app


class MountedApp:
    """What the plugin gives the api-server to mount: :func:`create_app`, built on its first
    request. Every task process loads the plugins too, and has no use for the app."""

    def __init__(self) -> None:
        self._app: FastAPI | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:  # on the event loop, which runs one coroutine at a time
            self._app = create_app()
        await self._app(scope, receive, send)


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    return JSONResponse({"detail": f"bad request: {where or exc}"}, status_code=400)


async def _headers(request: Request, call_next: Any) -> Response:
    response = await call_next(request)
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _engine() -> Any:
    try:
        return results_db.engine()
    except results_db.Unavailable as exc:  # one line, password hidden
        raise _unavailable(str(exc)) from None


def _unavailable(reason: str) -> HTTPException:
    return HTTPException(503, f"results database unavailable: {reason}",
                         headers={"Retry-After": str(max(1, math.ceil(results_db.retry_s())))})


def _query(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a browse query; a database failure is a 503. A lost server is remembered (the next
    requests get the 503 at once, for the back-off); other details go to the api-server log."""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from image_etl.store import StoreError

    eng = _engine()
    try:
        return call(eng, *args, **kwargs)
    except StoreError as exc:  # a (re)connect failed: one line, password hidden
        results_db.mark_down(str(exc))
        raise _unavailable(str(exc)) from None
    except DBAPIError as exc:
        if exc.connection_invalidated:
            results_db.mark_down("lost the connection to the results database")
            raise _unavailable("lost the connection to the results database") from None
        log.exception("Detections page: results database query failed")
        raise HTTPException(503, "results database query failed (see the api-server log)") from None
    except SQLAlchemyError:
        log.exception("Detections page: results database query failed")
        raise HTTPException(503, "results database query failed (see the api-server log)") from None


def _not_found(what: str) -> HTTPException:
    return HTTPException(404, f"{what} not found")


def _browse() -> Any:
    from image_etl import browse  # on first use: every task process loads the plugins

    return browse


def _run_key(run_id: str) -> str:
    from image_etl.store.schema import run_key  # on first use, as _browse

    return run_key(DAG_ID, run_id)


# --- the page ---------------------------------------------------------------------------------

def _page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> Response:
        # Served at <base>/detections/ (the views' hrefs end in "/"): its relative URLs need it.
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:  # a fixed table: nothing else under static/ is reachable
            raise _not_found("asset")
        return Response((STATIC / name).read_bytes(), media_type=ASSETS[name],
                        headers={"Cache-Control": "private, max-age=300"})


# --- data ---------------------------------------------------------------------------------------

def _data_routes(app: FastAPI) -> None:
    @app.get("/api/models")
    def models() -> dict[str, Any]:
        return {"dag_id": DAG_ID, "models": _query(_browse().model_list)}

    @app.get("/api/nights")
    def nights(model: Model, nights: Annotated[int, Query(ge=1, le=366)] = 30) -> dict[str, Any]:
        return _query(_browse().nights, model, nights)

    @app.get("/api/night")
    def night(model: Model, date: Day) -> dict[str, Any]:
        found = _query(_browse().night, model, date)
        if found is None:
            raise _not_found(f"night {date} of this model")
        return found

    @app.get("/api/images")
    def image_list(model: Model | None = None, date: Day | None = None,
                   run_id: Annotated[str | None, Query(min_length=1, max_length=250)] = None,
                   class_name: ClassName = None, min_conf: MinConf = None, limit: Limit = 100,
                   offset: Offset = 0) -> dict[str, Any]:
        browse = _browse()
        flt = browse.ImageFilter(class_name=class_name, min_conf=min_conf)
        if run_id is not None and model is None and date is None:
            return _query(browse.run_images, _run_key(run_id), flt, limit, offset)
        if run_id is None and model is not None and date is not None:
            return _query(browse.night_images, model, date, flt, limit, offset)
        raise HTTPException(400, "bad request: give model and date, or run_id")

    @app.get("/api/failures")
    def failures(model: Model, date: Day, limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
        return _query(_browse().night_failures, model, date, limit, offset)

    @app.get("/api/images/{image_id}")
    def image(image_id: ImageId) -> dict[str, Any]:
        found = _query(_browse().image_detail, image_id)
        if found is None:
            raise _not_found(f"image {image_id}")
        return found

    @app.get("/api/run")
    def run(run_id: RunId) -> dict[str, Any]:
        found = _query(_browse().run_overview, _run_key(run_id))
        if found is None:
            raise _not_found(f"run {run_id!r} in the results database")
        return {"dag_id": DAG_ID, **found}


# --- pictures -----------------------------------------------------------------------------------

def _image_routes(app: FastAPI) -> None:
    @app.get("/api/images/{image_id}/thumbnail")
    def thumbnail(image_id: ImageId) -> Response:
        jpeg, cached = pictures.thumbnail(_recorded_file(image_id))
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600",
                                 "X-Thumbnail-Cache": "hit" if cached else "miss"})

    @app.get("/api/images/{image_id}/region")
    def region(image_id: ImageId, x: Annotated[int, Query(ge=0, le=1_000_000)],
               y: Annotated[int, Query(ge=0, le=1_000_000)],
               w: Annotated[int, Query(ge=1, le=1_000_000)],
               h: Annotated[int, Query(ge=1, le=1_000_000)]) -> Response:
        jpeg, box = pictures.region(_recorded_file(image_id), x, y, w, h)
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600",
                                 "X-Region": ",".join(map(str, box))})


def _recorded_file(image_id: int) -> Any:
    found = _query(_browse().image_file, image_id)
    if found is None:
        raise _not_found(f"image {image_id}")
    return found
