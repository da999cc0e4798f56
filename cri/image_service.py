"""ImageService: CRI image calls translated onto the shared image store."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import grpc

from cri import validate
from cri.errors import answer_unimplemented
from images.auth import Credentials
from images.manifest import user_of
from images.store import ImageRecord, ImageStore
from protos import cri_pb2 as pb
from protos import cri_pb2_grpc


def image_message(record: ImageRecord) -> pb.Image:
    uid, username = user_of(record.user)
    image = pb.Image(
        id=record.image_id,
        repo_tags=record.repo_tags,
        repo_digests=record.repo_digests,
        size=record.size,
        username=username,
        spec=pb.ImageSpec(image=record.image_id),
    )
    if uid is not None:
        image.uid.value = uid
    return image


def _credentials(auth: pb.AuthConfig) -> Credentials | None:
    if not any((auth.username, auth.password, auth.auth, auth.identity_token, auth.registry_token)):
        return None
    return Credentials.from_cri(
        username=auth.username,
        password=auth.password,
        auth_b64=auth.auth,
        server_address=auth.server_address,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )


class ImageServicer(cri_pb2_grpc.ImageServiceServicer):
    def __init__(self, store: ImageStore) -> None:
        self.store = store

    def _list(self, image_filter: pb.ImageFilter) -> list[pb.Image]:
        if image_filter.image.image:
            validate.image_spec(image_filter.image, "filter.image")
            record = self.store.resolve(image_filter.image.image)
            return [image_message(record)] if record else []
        return [image_message(r) for r in self.store.list()]

    async def ListImages(
        self, request: pb.ListImagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=self._list(request.filter))

    async def StreamImages(
        self, request: pb.StreamImagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamImagesResponse]:
        images = self._list(request.filter)
        for start in range(0, len(images), 100):
            yield pb.StreamImagesResponse(images=images[start : start + 100])

    async def ImageStatus(
        self, request: pb.ImageStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImageStatusResponse:
        validate.image_spec(request.image, "image")
        record = self.store.resolve(request.image.image)
        if record is None:
            return pb.ImageStatusResponse()
        info = {}
        if request.verbose:
            info["info"] = json.dumps(
                {
                    "id": record.image_id,
                    "manifestDigest": record.manifest_digest,
                    "layers": record.layers,
                    "imageSpec": self.store.config_of(record),
                }
            )
        return pb.ImageStatusResponse(image=image_message(record), info=info)

    async def PullImage(self, request: pb.PullImageRequest, context: grpc.aio.ServicerContext) -> pb.PullImageResponse:
        validate.pull_image(request)
        record = await self.store.pull(request.image.image, _credentials(request.auth))
        return pb.PullImageResponse(image_ref=record.image_id)

    async def RemoveImage(
        self, request: pb.RemoveImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveImageResponse:
        validate.image_spec(request.image, "image")
        await self.store.remove(request.image.image)
        return pb.RemoveImageResponse()

    async def ImageFsInfo(
        self, request: pb.ImageFsInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImageFsInfoResponse:
        usage = self.store.usage()
        fs = pb.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=pb.FilesystemIdentifier(mountpoint=str(usage.mountpoint)),
            used_bytes=pb.UInt64Value(value=usage.used_bytes),
            inodes_used=pb.UInt64Value(value=usage.inodes_used),
        )
        return pb.ImageFsInfoResponse(image_filesystems=[fs])


answer_unimplemented(ImageServicer, cri_pb2_grpc.ImageServiceServicer, "ImageService")
