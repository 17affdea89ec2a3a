# Debian's packages the tests run: Bazel (a real REAPI client, with the JDK it depends on) and
# the AWS CLI (reads what casframe writes to S3).
prereqs_apt_install bazel-bootstrap awscli
