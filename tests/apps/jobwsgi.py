"""jobapp as a WSGI module for servers that take a module and a callable (uWSGI)."""

from jobapp import create_app

application = create_app()
