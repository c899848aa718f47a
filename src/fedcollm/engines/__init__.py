"""Engines move messages between the server and the clients; algorithms never see them."""
