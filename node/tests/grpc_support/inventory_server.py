#!/usr/bin/env python3
"""An independent gRPC server for stampede's interop test: Python's grpcio (C core)
serving shop.Inventory from examples/proto/inventory.proto (all four kinds of call:
unary, server-, client- and bidirectional streaming), with messages built from
descriptors at run time (google.protobuf, no generated code).

Usage: inventory_server.py [CERT KEY]   (TLS when a certificate is given, h2c otherwise)
Prints "PORT n" once listening; when its standard input closes it prints the calls it
served as one JSON line and exits.
"""
import json
import sys
import threading
from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto


def build_messages():
    fdp = descriptor_pb2.FileDescriptorProto(
        name="inventory.proto", package="shop", syntax="proto3"
    )

    def message(name, fields):
        m = fdp.message_type.add(name=name)
        for number, (fname, ftype) in enumerate(fields, start=1):
            m.field.add(name=fname, number=number, type=ftype, label=F.LABEL_OPTIONAL)

    message("StockRequest", [("product_id", F.TYPE_UINT64)])
    message("WatchRequest", [("product_id", F.TYPE_UINT64), ("updates", F.TYPE_UINT32)])
    message(
        "Stock",
        [("product_id", F.TYPE_UINT64), ("quantity", F.TYPE_UINT32), ("warehouse", F.TYPE_STRING)],
    )
    message("StockTotal", [("products", F.TYPE_UINT32), ("quantity", F.TYPE_UINT64)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)

    def cls(name):
        d = pool.FindMessageTypeByName("shop." + name)
        if hasattr(message_factory, "GetMessageClass"):
            return message_factory.GetMessageClass(d)
        return message_factory.MessageFactory(pool).GetPrototype(d)

    return cls("StockRequest"), cls("WatchRequest"), cls("Stock"), cls("StockTotal")


StockRequest, WatchRequest, Stock, StockTotal = build_messages()
calls = {
    "GetStock": 0,
    "WatchStock": 0,
    "streamed": 0,
    "metadata_ok": 0,
    "TotalStock": 0,
    "StockFeed": 0,
    "received": 0,
}
lock = threading.Lock()


def stock(product_id, update):
    return Stock(
        product_id=product_id,
        quantity=max(0, 1000 - product_id - update),
        warehouse="py-%d" % (product_id % 3),
    )


def get_stock(request, context):
    with lock:
        calls["GetStock"] += 1
        if dict(context.invocation_metadata()).get("x-shopper", "").startswith("vu-"):
            calls["metadata_ok"] += 1
    if request.product_id == 0 or request.product_id > 1000:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such product")
    context.set_trailing_metadata((("x-served-by", "grpcio"),))
    return stock(request.product_id, 0)


def watch_stock(request, context):
    with lock:
        calls["WatchStock"] += 1
    for i in range(min(request.updates, 100)):
        with lock:
            calls["streamed"] += 1
        yield stock(request.product_id, i)


def total_stock(requests, context):
    """Client-streaming: the products received and their summed quantity."""
    with lock:
        calls["TotalStock"] += 1
    total = StockTotal()
    for request in requests:
        with lock:
            calls["received"] += 1
        if request.product_id == 0 or request.product_id > 1000:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such product")
        total.products += 1
        total.quantity += stock(request.product_id, 0).quantity
    return total


def stock_feed(requests, context):
    """Bidirectional: one Stock per request, answered as each arrives."""
    with lock:
        calls["StockFeed"] += 1
    for request in requests:
        with lock:
            calls["received"] += 1
        if request.product_id == 0 or request.product_id > 1000:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such product")
        yield stock(request.product_id, 0)


def main():
    handler = grpc.method_handlers_generic_handler(
        "shop.Inventory",
        {
            "GetStock": grpc.unary_unary_rpc_method_handler(
                get_stock,
                request_deserializer=StockRequest.FromString,
                response_serializer=Stock.SerializeToString,
            ),
            "WatchStock": grpc.unary_stream_rpc_method_handler(
                watch_stock,
                request_deserializer=WatchRequest.FromString,
                response_serializer=Stock.SerializeToString,
            ),
            "TotalStock": grpc.stream_unary_rpc_method_handler(
                total_stock,
                request_deserializer=StockRequest.FromString,
                response_serializer=StockTotal.SerializeToString,
            ),
            "StockFeed": grpc.stream_stream_rpc_method_handler(
                stock_feed,
                request_deserializer=StockRequest.FromString,
                response_serializer=Stock.SerializeToString,
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    if len(sys.argv) == 3:
        with open(sys.argv[1], "rb") as c, open(sys.argv[2], "rb") as k:
            creds = grpc.ssl_server_credentials(((k.read(), c.read()),))
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("PORT %d" % port, flush=True)
    sys.stdin.read()
    server.stop(grace=1).wait(5)
    with lock:
        print(json.dumps(calls), flush=True)


if __name__ == "__main__":
    main()
