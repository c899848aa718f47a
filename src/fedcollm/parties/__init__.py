"""The parties of a run: what the server and each client hold, built from the experiment."""
