"""Path parameter types shared by the routers."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class AnyCoachId(Convertor[str]):
    """Matches any non-empty text, slashes and line breaks included, so that every
    malformed coach id (``a%2Fb``, ``a%0Ab``) reaches the coach id check and is answered
    422 invalid_coach_id instead of missing the route with a 404."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("coach_id", AnyCoachId())
