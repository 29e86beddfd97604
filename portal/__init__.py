"""The aiportal web app, JSON API, CLI and the services behind them."""

__version__ = "0.1.0"
