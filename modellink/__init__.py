"""The model link: the Responses protocol over persistent WebSockets, the sim model, the HTTP baseline."""
