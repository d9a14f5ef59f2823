"""The REST service of mlops-flows (FastAPI): a thin HTTP face over flows/, tasks/ and blocks/."""
