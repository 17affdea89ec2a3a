# Debian's packages the tests run: Bazel (a real REAPI client, with the JDK it depends on), the
# AWS CLI (reads what casframe writes to S3), Prometheus (scrapes `casframe serve --metrics-listen`)
# and its Pushgateway (receives `casframe gc --metrics-push`).
prereqs_apt_install bazel-bootstrap awscli prometheus prometheus-pushgateway
