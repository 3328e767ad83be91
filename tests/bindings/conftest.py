from _routes import route  # noqa: F401  (the route fixture: tests/_routes.py)
