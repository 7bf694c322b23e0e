"""boto3, imported on first use, and AWS's errors as bigmachine errors that say what
to fix.

Every client honours endpoint_url (moto, LocalStack) and retries throttling
and transient errors with botocore's own retry modes (standard or adaptive),
never a limiter of ours. Credentials and region come from boto3's usual chain.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

from ...errors import Error

RETRY_ATTEMPTS = 8


class AWSError(Error):
    """An AWS request failed; code is AWS's error code (or botocore's exception name)."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


def load_boto3() -> Any:
    """boto3, imported here only: nothing imports it unless EC2 is used."""
    try:
        import boto3
    except ImportError as exc:
        raise Error("bigmachine.EC2 needs boto3: pip install 'bigmachine[ec2]'") from exc
    return boto3


class AWS:
    """The AWS clients of one EC2 system (made on first use, shared by its threads)."""

    def __init__(self, region: Optional[str], endpoint_url: Optional[str],
                 retry_mode: str = "adaptive"):
        self.region_name = region
        self.endpoint_url = endpoint_url
        self.retry_mode = retry_mode
        self._lock = threading.Lock()
        self._session: Any = None
        self._clients: dict[str, Any] = {}

    def client(self, service: str) -> Any:
        """The boto3 client of service ("ec2", "ssm", ...): one session, endpoint_url and
        retry settings for all of them."""
        with self._lock:
            if service not in self._clients:
                boto3 = load_boto3()
                from botocore.config import Config

                config = Config(retries={"mode": self.retry_mode,
                                         "max_attempts": RETRY_ATTEMPTS},
                                connect_timeout=10, read_timeout=60)
                try:
                    if self._session is None:
                        self._session = boto3.session.Session(region_name=self.region_name)
                    self._clients[service] = self._session.client(
                        service, endpoint_url=self.endpoint_url, config=config)
                except Exception as exc:
                    raise explain(exc, f"make an AWS {service} client") from exc
            return self._clients[service]

    @property
    def ec2(self) -> Any:
        return self.client("ec2")

    @property
    def region(self) -> str:
        return self.ec2.meta.region_name


HINTS = {
    "InvalidInstanceType": "choose an instance_type this region offers "
                           "(aws ec2 describe-instance-types)",
    "InvalidAMIID": "AMIs are regional: pass ami= an image id of this region, with the "
                    "driver's Python",
    "InvalidSubnetID": "pass subnet= a subnet id of this region (aws ec2 describe-subnets)",
    "InvalidSubnet": "pass subnet= a subnet id of this region (aws ec2 describe-subnets)",
    "InvalidGroup": "pass security_groups= group ids of the subnet's VPC, or none to let "
                    "bigmachine make one",
    "InvalidParameterValue": "check the EC2(...) option named in the message",
    "InstanceLimitExceeded": "your account's EC2 quota is reached: start fewer machines, a "
                             "smaller instance_type, or ask for more (Service Quotas, "
                             "'Running On-Demand instances')",
    "VcpuLimitExceeded": "your account's vCPU quota is reached: start fewer machines, a "
                         "smaller instance_type, or ask for more (Service Quotas)",
    "MaxSpotInstanceCountExceeded": "your spot quota is reached: ask for more (Service "
                                    "Quotas) or pass spot=False",
    "InsufficientInstanceCapacity": "EC2 has no capacity for this instance type there now: "
                                    "try another instance_type or subnet (availability "
                                    "zone), or later; spot=True falls back to on-demand",
    "InsufficientFreeAddressesInSubnet": "the subnet has no free addresses: pass another "
                                         "subnet=",
    "UnauthorizedOperation": "the credentials may not do this: grant their IAM identity the "
                             "EC2 actions bigmachine uses (see the README)",
    "AccessDeniedException": "the credentials may not do this: grant their IAM identity the "
                             "actions bigmachine uses (see the README)",
    "AuthFailure": "AWS refused the credentials: check AWS_ACCESS_KEY_ID / AWS_PROFILE",
    "InvalidClientTokenId": "AWS does not know these credentials: check AWS_ACCESS_KEY_ID "
                            "/ AWS_PROFILE",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check "
                             "AWS_SECRET_ACCESS_KEY / AWS_PROFILE",
    "RequestExpired": "this host's clock is wrong: AWS refuses requests signed more than 5 "
                      "minutes off",
}
CAPACITY = {"InsufficientInstanceCapacity", "InsufficientCapacity", "SpotMaxPriceTooLow",
            "InsufficientHostCapacity", "InsufficientReservedInstanceCapacity"}


def explain(exc: BaseException, doing: str) -> AWSError:
    """exc (from boto3) as an AWSError that says what to fix; the caller raises it."""
    from botocore import exceptions as be

    if isinstance(exc, (be.NoCredentialsError, be.PartialCredentialsError)):
        return AWSError(type(exc).__name__, f"cannot {doing}: no AWS credentials found. Set "
                        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run "
                        "`aws configure` (boto3's usual chain)")
    if isinstance(exc, be.NoRegionError):
        return AWSError("NoRegionError", f"cannot {doing}: no AWS region: pass "
                        "EC2(region=...) or set AWS_DEFAULT_REGION")
    if isinstance(exc, be.EndpointConnectionError):
        return AWSError("EndpointConnectionError", f"cannot {doing}: cannot reach AWS ({exc}); "
                        "check region=, endpoint_url= and this host's network")
    if isinstance(exc, be.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        hint = HINTS.get(code) or HINTS.get(code.split(".")[0]) or ""
        return AWSError(code, f"cannot {doing}: {code}: {error.get('Message', exc)}"
                        + (f"; {hint}" if hint else ""))
    return AWSError(type(exc).__name__, f"cannot {doing}: {exc}")
