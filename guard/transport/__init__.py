"""Transports: the gRPC servicers (and their generated stubs) on top of the service layer."""
