"""The Open Inference Protocol (KServe v2) messages, generated from protos/kserve/grpc_predict_v2.proto by
protos/generate.sh (`make protos`); attrserve_service.oip serves them."""
